"""What a published state dict holds besides the weights, read into what this package keeps (used by ``convert``).

- ``pos_embed`` [1, 1+F·T, D]: the published model adds ``pos_embed[:, 1:]`` to the patch tokens (truncated along
  time for a short input) and ``cls_token + pos_embed[:, :1]`` as the CLS token (aurianworld/matpac
  ``inference_matpac/matpac/model.py:326-337``); it is a ``requires_grad=False`` parameter (model.py:62-66), so any
  table can sit there: the 2-D sin-cos table of the grid (pretrained encoders), m2d's bicubic resampling of a shorter
  sin-cos table (fine-tuned the m2d way, nttcslab/m2d ``m2d/runtime_audio.py:153-158``), or another (learned) one.
  The sin-cos table is recomputed, not stored; any other is kept as the weight ``tokenizer/pos_embed`` [F·T, D]
  (``models.vit.Tokenizer(stored_positions=True)``); a non-zero CLS row is added to ``cls_token``, which is what the
  published forward computes. ``read_positions`` says which it found.
- ``log_mel.MelSpectrogram.spectrogram.window`` [n_fft] and ``log_mel.MelSpectrogram.mel_scale.fb`` [n_fft/2+1, M]:
  the two buffers of the torchaudio front-end (``torchaudio.transforms.MelSpectrogram`` inside ``logMelSpectrogram``,
  aurianworld/matpac ``inference_matpac/matpac/preprocess.py:94-111``, built at model.py:71-79) that the published
  model's full ``state_dict()`` carries. They are not weights: ``check_frontend_buffers`` compares them with this
  package's front-end (``audio.frontend.hann_window`` / ``mel_filterbank``; torchaudio builds them in float32, 4e-6
  of the filterbank's peak from ours) and accounts for them, or names how they differ.
"""

from __future__ import annotations

import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, hann_window, mel_filterbank
from matpac_jax.models.positions import m2d_positions
from matpac_jax.models.vit import sincos_pos_embed_2d

POS_TOL = 1e-5  # a float32 table this close to a rule is that rule (torch's float32 bicubic: 1.5e-6 from float64)
FRONTEND_PREFIX = "log_mel."
FRONTEND_BUFFERS = ("log_mel.MelSpectrogram.spectrogram.window", "log_mel.MelSpectrogram.mel_scale.fb")
FRONTEND_TOL = 1e-4  # relative to the buffer's peak; a front-end of other parameters differs by O(1)


def read_positions(pos: np.ndarray, grid_f: int, grid_t: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """``pos_embed`` [1, 1+F·T, D] -> (CLS row [D], the table to store [F·T, D] or None for sin-cos, an account)."""
    pos = np.asarray(pos, np.float32)
    dim = pos.shape[-1]
    cls_row, table = pos[0, 0], pos[0, 1:]
    sincos = sincos_pos_embed_2d(dim, grid_f, grid_t, cls_row=False)
    err = float(np.max(np.abs(table - sincos)))
    cls_note = "" if not np.any(cls_row) else "; its CLS row is added to cls_token (as the published forward does)"
    if err <= POS_TOL:
        return cls_row, None, f"pos_embed: the 2-D sin-cos table of the {grid_f}x{grid_t} grid (recomputed){cls_note}"
    for t0 in range(1, grid_t):
        resampled = m2d_positions(sincos_pos_embed_2d(dim, grid_f, t0, cls_row=False), grid_f, grid_t)
        if float(np.max(np.abs(table - resampled))) <= POS_TOL:
            how = f"the {grid_f}x{t0} sin-cos table resampled bicubically to {grid_f}x{grid_t} as m2d does"
            return cls_row, table, f"pos_embed: {how}, kept as weights (tokenizer/pos_embed){cls_note}"
    how = f"neither sin-cos nor a resampled sin-cos table ({err:.3g} from the {grid_f}x{grid_t} sin-cos table)"
    return cls_row, table, f"pos_embed: {how}, kept as weights (tokenizer/pos_embed){cls_note}"


def check_frontend_buffers(sd: dict, cfg: LogMelConfig) -> tuple[list[str], list[str], str]:
    """(the front-end keys accounted for, problems, a note). Keys under ``log_mel.`` other than the two torchaudio
    buffers are left out of both lists (the converter reports them as unknown)."""
    present = [k for k in FRONTEND_BUFFERS if k in sd]
    if not present:
        return [], [], ""
    ours = {FRONTEND_BUFFERS[0]: hann_window(cfg), FRONTEND_BUFFERS[1]: mel_filterbank(cfg)}
    problems = []
    for key in present:
        have, want = np.asarray(sd[key], np.float64), ours[key]
        if have.shape != want.shape:
            problems.append(f"{key} has shape {list(have.shape)}, this front-end's is {list(want.shape)}")
        elif np.max(np.abs(have - want)) > FRONTEND_TOL * np.max(np.abs(want)):
            rel = np.max(np.abs(have - want)) / np.max(np.abs(want))
            problems.append(f"{key} differs from this front-end's by {rel:.2g} of its peak")
    if problems:
        fix = (
            f"the file's model used another front-end than {cfg}; its weights expect that input (remove the "
            f"{FRONTEND_PREFIX}* keys to convert them anyway)"
        )
        return present, [f"{'; '.join(problems)}: {fix}"], ""
    return present, [], f"left out the torchaudio front-end buffers {present}: equal to this front-end's"
