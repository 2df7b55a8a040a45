"""Position tables for inputs longer (or shorter) than the pretraining crop, brought there as m2d does.

m2d fine-tunes on longer inputs than it pretrains on (AudioSet: 62 time patches against 38) and moves the pretrained
table to the new grid before loading the weights (nttcslab/m2d ``m2d/runtime_audio.py:153-166``):

- longer: ``resample_abs_pos_embed(pos_embed, old_size=[F, T0], new_size=[F, T])`` (runtime_audio.py:156-157), timm's
  function as m2d copies it (``m2d/timm_layers_pos_embed.py``, the diff in ``patch_m2d.diff``): the CLS row is kept
  as it is, the [F·T0, D] rows are viewed as an [F, T0] grid (frequency-major, the order of the token sequence) and
  resized with ``F.interpolate(posemb, size=new_size, mode='bicubic')`` -- ``align_corners`` left at its default,
  False, and ``antialias`` removed by m2d's patch (so False: torch's plain bicubic, A = -0.75);
- shorter: the first T time columns are kept (runtime_audio.py:159-166);
- equal: unchanged.

The positions are not trained afterwards (models_mae: ``pos_embed`` is a ``requires_grad=False`` parameter), so the
result is a constant of the fine-tuned model, which therefore carries it as weights (``Tokenizer(stored_positions=
True)``). From the 5x38 sin-cos table the 5x62 table differs from the 5x62 sin-cos table by up to 2.02 per element:
frequency rows are copied exactly (an equal-size axis has weights [0, 1, 0, 0]), time columns are interpolated.

``bicubic_resize`` is torch's ``upsample_bicubic2d`` (aten ``native/UpSample.h``: ``area_pixel_compute_scale``,
``area_pixel_compute_source_index(..., cubic=true)``, ``guard_index_and_lambda``, ``cubic_convolution1/2``,
``get_cubic_upsample_coefficients``; used by ``native/cpu/UpSampleKernel.cpp``) computed in float64 NumPy as two
separable [out, in] weight matrices. Agreement: tests/test_positions.py.
"""

from __future__ import annotations

import numpy as np

CUBIC_A = -0.75  # aten UpSample.h get_cubic_upsample_coefficients: "A = -0.75" (PIL and OpenCV's bicubic)


def _cubic_coefficients(t: np.ndarray, a: float = CUBIC_A) -> np.ndarray:
    """[N] fractions t in [0, 1] -> [N, 4] weights of the taps at floor - 1 .. floor + 2 (Keys' cubic convolution)."""

    def near(x):  # |x| <= 1: cubic_convolution1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2: cubic_convolution2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_weights(in_size: int, out_size: int, align_corners: bool = False) -> np.ndarray:
    """[out_size, in_size] float64 matrix W with ``resized = W @ x`` along one axis, as torch's bicubic upsampling
    computes it: the source coordinate ``scale·(i + 0.5) - 0.5`` (align_corners False, ``scale = in / out``; not
    clamped at 0 for cubic) or ``i·(in - 1)/(out - 1)`` (True); ``floor`` of it capped at ``in - 1`` and the fraction
    clamped to [0, 1]; taps outside [0, in - 1] read the border (clamped indices), their weights summed there."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic_weights: sizes must be positive, got in {in_size}, out {out_size}")
    i = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = i * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = (in_size / out_size) * (i + 0.5) - 0.5
    base = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    coeffs = _cubic_coefficients(np.clip(src - base, 0.0, 1.0))  # [out, 4]
    w = np.zeros((out_size, in_size))
    for j in range(4):
        np.add.at(w, (np.arange(out_size), np.clip(base - 1 + j, 0, in_size - 1)), coeffs[:, j])
    return w


def bicubic_resize(x: np.ndarray, size: tuple[int, int], align_corners: bool = False) -> np.ndarray:
    """``torch.nn.functional.interpolate(x, size=size, mode='bicubic', align_corners=align_corners)`` on the last two
    axes of ``x`` [..., H, W] -> [..., size[0], size[1]], in float64."""
    wh = bicubic_weights(x.shape[-2], size[0], align_corners)
    ww = bicubic_weights(x.shape[-1], size[1], align_corners)
    return np.einsum("oh,...hw,pw->...op", wh, np.asarray(x, np.float64), ww)


def m2d_positions(table: np.ndarray, grid_freq: int, grid_time: int) -> np.ndarray:
    """A patch position table [F·T0, D] (frequency-major, no CLS row) moved to ``grid_time`` time patches as m2d does
    (runtime_audio.py:153-166): bicubic resize of the [F, T0] grid when longer, its first columns when shorter.
    Returns [F·grid_time, D] float32."""
    table = np.asarray(table)
    rows, dim = table.shape
    if rows % grid_freq:
        raise ValueError(f"a position table of {rows} rows is not a grid of {grid_freq} frequency patches")
    t0 = rows // grid_freq
    grid = table.reshape(grid_freq, t0, dim)
    if grid_time > t0:
        grid = np.moveaxis(bicubic_resize(np.moveaxis(grid, -1, 0), (grid_freq, grid_time)), 0, -1)  # [D, F, T] inside
    else:
        grid = grid[:, :grid_time]
    return np.ascontiguousarray(grid.reshape(grid_freq * grid_time, dim), np.float32)
