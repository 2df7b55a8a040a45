r"""Convert between the published PyTorch state dicts (SPEC §5 key names) and this package's encoders.

    python -m matpac_jax.convert --torch-checkpoint=matpac_plus_6s_2048_enconly.pt --output=models/pp
    python -m matpac_jax.convert --torch-checkpoint=as_ft_with_head.pt --output=models/pp_as      # + 527-class head
    python -m matpac_jax.convert --torch-checkpoint=enc.pt --probe=esc50.pth --output=models/pp_esc50
    python -m matpac_jax.convert --checkpoint=runs/pp --to-torch=pp.pt     # ours -> published layout (.pt with
                                                                           # torch installed, else .safetensors)

Keys read (every key of the file must be one of these, or the conversion fails listing the others):

- encoder: ``cls_token`` [1,1,D], ``pos_embed`` [1,1+F·T,D] (any table: the 2-D sin-cos one is recomputed, not
  stored; m2d's resampled table or a learned one is kept as the weight ``tokenizer/pos_embed``; see
  ``published_layout``, which the conversion's printed account follows),
  ``patch_embed.proj.weight`` [D,1,16,16] + ``.bias``, ``student_encoder.blocks.{i}.norm1|norm2.weight|bias``,
  ``...attn.qkv.weight`` [3D,D] (rows q;k;v) + ``.bias``, ``...attn.proj.weight|bias``, ``...mlp.fc1.weight|bias``,
  ``...mlp.fc2.weight|bias``, ``student_encoder.norm.weight|bias``;
- AudioSet fine-tuned head: ``head_norm.running_mean|running_var|num_batches_tracked`` (BatchNorm1d without affine),
  ``head.weight`` [527,D], ``head.bias`` (with 992-frame positions: pos_embed [1,311,D]); units pass through in
  their order, AudioSet's classes sorted by mid on both sides (``data.audioset_classes``);
- a linear probe (``--probe`` file or in the same file): ``probe.weight`` [C,F·D], ``probe.bias``.
- the published model's full ``state_dict()`` also holds its torchaudio front-end's buffers
  ``log_mel.MelSpectrogram.spectrogram.window`` and ``.mel_scale.fb``: left out with a note when they equal this
  package's front-end, refused naming the difference otherwise.

- a full training checkpoint (a fairseq file: the weights under ``model``): the predictor ``decoder.decoder_embed``,
  ``decoder.mask_token``, ``decoder.decoder_pos_embed`` (checked), ``decoder.decoder_blocks.{i}.*``,
  ``decoder.decoder_norm``, the MCL heads ``mcl_heads.mcl_heads.{k}`` (MATPAC++; ``decoder.decoder_pred`` is then
  unused by the published model and kept as ``predictor/decoder_pred``) or ``decoder.decoder_pred`` (MATPAC), the
  student cls head ``cls_student_head.mlp.{0,2,4}`` + ``last_layer.weight_g|weight_v``, the EMA teachers as the nested
  dicts ``_ema`` (``blocks.*``, ``norm.*``) and ``_cls_head_ema`` (``mlp.*``, ``last_layer.*``), and
  ``cls_head_loss.center``. They become the groups ``predictor``, ``cls_head``, ``teacher``, ``center`` of the encoder
  directory (``load_encoder`` uses the encoder; the rest is there for analysis and converts back exactly).
  ``--encoder-only`` converts the student encoder alone and reports how many keys it left out.
PyTorch is needed only to read or write ``.pt`` files (``pip install 'matpac_jax[torch]'``). A ``.pt`` file is data,
never code: it is read with ``torch.load(weights_only=True)``, which builds only tensors and plain containers, plus,
for this one call, the plain data of a fairseq checkpoint (``argparse.Namespace`` args, numpy scalars); a file that
needs any other object is refused naming it (re-save its state dict alone with ``torch.save``), and without PyTorch a
``.pt`` file is refused, never unpickled. A malformed ``.safetensors`` file fails naming the file and the problem;
every error prints one ``error:`` line and exits 2. Outputs are checked before the conversion and written atomically.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import uuid

import numpy as np

from matpac_jax.audio.frontend import LogMelConfig
from matpac_jax.fileio import TMP_MARK, unwritable_reason
from matpac_jax.inference import Encoder, EncoderSpec
from matpac_jax.load import load_encoder
from matpac_jax.models.vit import sincos_pos_embed_2d
from matpac_jax.published_layout import check_frontend_buffers, read_positions
from matpac_jax.saved_model import MODEL_FILE, refuse_other_kind, unflatten
from matpac_jax.state_dict_io import ConversionError, read_state_dict, state_dict_path, write_state_dict
from matpac_jax.trees import flatten

TRAINING_ONLY = re.compile(r"^(decoder\.|mcl_heads\.|cls_student_head\.|cls_head_loss\.|_ema\.|_cls_head_ema\.)")
_BLOCK = "student_encoder.blocks.{i}."
# (torch suffix, our path inside encoder/blocks_i, transpose?)
_BLOCK_KEYS = [
    ("norm1.weight", "norm1/scale", False),
    ("norm1.bias", "norm1/bias", False),
    ("attn.qkv.weight", "attn/qkv/kernel", True),
    ("attn.qkv.bias", "attn/qkv/bias", False),
    ("attn.proj.weight", "attn/proj/kernel", True),
    ("attn.proj.bias", "attn/proj/bias", False),
    ("norm2.weight", "norm2/scale", False),
    ("norm2.bias", "norm2/bias", False),
    ("mlp.fc1.weight", "mlp/fc1/kernel", True),
    ("mlp.fc1.bias", "mlp/fc1/bias", False),
    ("mlp.fc2.weight", "mlp/fc2/kernel", True),
    ("mlp.fc2.bias", "mlp/fc2/bias", False),
]


def _map_blocks(sd: dict, torch_prefix: str, ours: str, flat: dict, used: set, problems: list) -> int:
    """Transformer blocks ``{torch_prefix}{i}.*`` -> ``{ours}/blocks_{i}/*``; returns the depth found."""
    depth = 0
    while f"{torch_prefix}{depth}.norm1.weight" in sd:
        for suffix, name, transpose in _BLOCK_KEYS:
            key = f"{torch_prefix}{depth}.{suffix}"
            if key not in sd:
                problems.append(f"missing {key}")
                continue
            used.add(key)
            flat[f"{ours}/blocks_{depth}/{name}"] = sd[key].T if transpose else sd[key]
        depth += 1
    return depth


def _map_linear(sd: dict, torch_name: str, ours: str, flat: dict, used: set, problems: list, bias=True) -> None:
    for suffix, name, transpose in (("weight", "kernel", True),) + ((("bias", "bias", False),) if bias else ()):
        key = f"{torch_name}.{suffix}"
        if key not in sd:
            problems.append(f"missing {key}")
            continue
        used.add(key)
        flat[f"{ours}/{name}"] = sd[key].T if transpose else sd[key]


def _map_norm(sd: dict, torch_name: str, ours: str, flat: dict, used: set, problems: list) -> None:
    for suffix, name in (("weight", "scale"), ("bias", "bias")):
        key = f"{torch_name}.{suffix}"
        if key not in sd:
            problems.append(f"missing {key}")
            continue
        used.add(key)
        flat[f"{ours}/{name}"] = sd[key]


def _map_cls_head(sd: dict, prefix: str, ours: str, flat: dict, used: set, problems: list) -> None:
    """DINO-style head: ``mlp.{0,2,4}`` linears and the weight-normalised ``last_layer`` (``weight_g`` [P,1],
    ``weight_v`` [P,bottleneck]) -> ``mlp_{0,2,4}``, ``weight_g`` [P], ``weight_v`` [bottleneck,P]."""
    for i in (0, 2, 4):
        _map_linear(sd, f"{prefix}mlp.{i}", f"{ours}/mlp_{i}", flat, used, problems)
    for name in ("weight_g", "weight_v"):
        key = f"{prefix}last_layer.{name}"
        if key not in sd:
            problems.append(f"missing {key}")
            continue
        used.add(key)
        flat[f"{ours}/{name}"] = sd[key].reshape(-1) if name == "weight_g" else sd[key].T


def _map_training(sd: dict, grid_f: int, grid_t: int, flat: dict, used: set, problems: list) -> None:
    """Predictor (``decoder.*`` + ``mcl_heads.mcl_heads.{k}``), student cls head, EMA teachers (``_ema.*`` encoder
    blocks / norm, ``_cls_head_ema.*`` cls head) and ``cls_head_loss.center`` -> groups predictor, cls_head, teacher,
    center. Without MCL heads, ``decoder.decoder_pred`` is the single prediction head; with them it is unused by the
    published model and kept as ``predictor/decoder_pred`` so that the layout round-trips."""
    if "decoder.decoder_embed.weight" in sd:
        _map_linear(sd, "decoder.decoder_embed", "predictor/embed", flat, used, problems)
        for key, ours in (("decoder.mask_token", "predictor/mask_token"),):
            if key in sd:
                used.add(key)
                flat[ours] = sd[key]
            else:
                problems.append(f"missing {key}")
        if "decoder.decoder_pos_embed" in sd:
            used.add("decoder.decoder_pos_embed")
            pos = sd["decoder.decoder_pos_embed"]
            table = _pos_table(pos.shape[-1], grid_f, grid_t)
            if pos.shape != table.shape or np.max(np.abs(pos - table)) > 1e-5:
                problems.append("decoder.decoder_pos_embed is not the 2-D sin-cos table of the encoder's grid")
        _map_blocks(sd, "decoder.decoder_blocks.", "predictor/trunk", flat, used, problems)
        _map_norm(sd, "decoder.decoder_norm", "predictor/trunk/norm", flat, used, problems)
        k = 0
        while f"mcl_heads.mcl_heads.{k}.weight" in sd:
            _map_linear(sd, f"mcl_heads.mcl_heads.{k}", f"predictor/heads_{k}", flat, used, problems)
            k += 1
        if k == 0:
            _map_linear(sd, "decoder.decoder_pred", "predictor/heads_0", flat, used, problems)
        elif "decoder.decoder_pred.weight" in sd:
            _map_linear(sd, "decoder.decoder_pred", "predictor/decoder_pred", flat, used, problems)
    if "cls_student_head.mlp.0.weight" in sd:
        _map_cls_head(sd, "cls_student_head.", "cls_head", flat, used, problems)
    if any(key.startswith("_ema.") for key in sd):
        _map_blocks(sd, "_ema.blocks.", "teacher/encoder", flat, used, problems)
        _map_norm(sd, "_ema.norm", "teacher/encoder/norm", flat, used, problems)
    if any(key.startswith("_cls_head_ema.") for key in sd):
        _map_cls_head(sd, "_cls_head_ema.", "teacher/cls_head", flat, used, problems)
    if "cls_head_loss.center" in sd:
        used.add("cls_head_loss.center")
        flat["center"] = sd["cls_head_loss.center"].reshape(-1)


def _pos_table(dim: int, grid_f: int, grid_t: int) -> np.ndarray:
    return sincos_pos_embed_2d(dim, grid_f, grid_t, cls_row=True).astype(np.float32)[None]


def from_torch(
    sd: dict[str, np.ndarray],
    heads: int | None = None,
    n_mels: int = 80,
    encoder_only: bool = False,
    notes: list[str] | None = None,
) -> tuple[EncoderSpec, dict, list[str]]:
    """Published state dict (numpy arrays) -> (spec, params, training-only keys left out). Strict about keys.
    ``notes`` (a list, optional) receives the account of what was kept: the position table, the front-end buffers."""
    sd = dict(sd)
    missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias") if k not in sd]
    if missing:
        raise ConversionError(f"not a MATPAC encoder state dict: missing {missing} (have {sorted(sd)[:8]}...)")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = 0
    while f"{_BLOCK.format(i=depth)}norm1.weight" in sd:
        depth += 1
    grid_f = n_mels // patch
    n_tokens = sd["pos_embed"].shape[1] - 1
    if depth == 0 or n_tokens % grid_f:
        raise ConversionError(f"cannot read the shape: {depth} blocks, pos_embed {sd['pos_embed'].shape}")
    grid_t = n_tokens // grid_f
    heads = heads or dim // 64
    mlp_ratio = sd[f"{_BLOCK.format(i=0)}mlp.fc1.weight"].shape[0] / dim
    spec = EncoderSpec(dim, depth, heads, mlp_ratio, patch, n_mels, grid_t * patch, LogMelConfig())
    cls_row, table, pos_note = read_positions(sd["pos_embed"], grid_f, grid_t)
    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    flat = {
        "tokenizer/cls_token": sd["cls_token"] + cls_row,
        "tokenizer/proj/kernel": np.transpose(sd["patch_embed.proj.weight"], (2, 3, 1, 0)),  # [D,1,f,t] -> [f,t,1,D]
        "tokenizer/proj/bias": sd["patch_embed.proj.bias"],
    }
    if table is not None:
        flat["tokenizer/pos_embed"] = table
    frontend_keys, problems, frontend_note = check_frontend_buffers(sd, spec.frontend)
    used.update(frontend_keys)
    _map_blocks(sd, "student_encoder.blocks.", "encoder", flat, used, problems)
    _map_norm(sd, "student_encoder.norm", "encoder/norm", flat, used, problems)
    if not encoder_only:
        _map_training(sd, grid_f, grid_t, flat, used, problems)
    if "head.weight" in sd:
        keys = ("head.weight", "head.bias", "head_norm.running_mean", "head_norm.running_var")
        problems += [f"missing {k}" for k in keys if k not in sd]
        if all(k in sd for k in keys):
            flat["head/kernel"], flat["head/bias"] = sd["head.weight"].T, sd["head.bias"]
            flat["head/norm_mean"], flat["head/norm_var"] = sd["head_norm.running_mean"], sd["head_norm.running_var"]
            used.update(keys + ("head_norm.num_batches_tracked",))
    if "probe.weight" in sd:
        if "probe.bias" not in sd:
            problems.append("missing probe.bias")
        else:
            flat.update({"probe/kernel": sd["probe.weight"].T, "probe/bias": sd["probe.bias"]})
            used.update(("probe.weight", "probe.bias"))
    rest = sorted(set(sd) - used)
    training = [k for k in rest if encoder_only and TRAINING_ONLY.match(k)]
    unknown = [k for k in rest if k not in training]
    if unknown:
        problems.append(f"unknown keys {unknown}")
    if problems:
        raise ConversionError("; ".join(problems))
    if notes is not None:
        notes += [pos_note] + ([frontend_note] if frontend_note else [])
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    _check_shapes(spec, params)
    if "teacher" in params and "tokenizer" in params:
        _check_shapes(spec, {"tokenizer": params["tokenizer"], "encoder": params["teacher"]["encoder"]})
    return spec, params, training


def _check_shapes(spec: EncoderSpec, params: dict) -> None:
    """Trace the encoder once with these parameters: any shape that does not fit the spec fails here."""
    import jax

    enc = Encoder(spec, {"tokenizer": params["tokenizer"], "encoder": params["encoder"]})
    mel = np.zeros((1, spec.n_mels, spec.crop_frames), np.float32)
    try:
        jax.eval_shape(lambda p: enc._encode_chunks(p, mel, False), enc.params)
    except Exception as e:  # flax ScopeParamShapeError and friends
        raise ConversionError(f"parameter shapes do not fit a ViT of {spec}: {e}") from None


def to_torch(spec: EncoderSpec, params: dict) -> dict[str, np.ndarray]:
    """Our encoder (+ head / probe) -> the published key layout (numpy arrays, float32)."""
    flat = flatten(params, leaf=np.asarray)
    grid_f, grid_t = spec.n_mels // spec.patch, spec.crop_frames // spec.patch
    pos = _pos_table(spec.dim, grid_f, grid_t)
    if "tokenizer/pos_embed" in flat:  # a stored table (models.positions / an imported one); the CLS row stays 0
        pos = np.concatenate([pos[:, :1], flat["tokenizer/pos_embed"][None]], axis=1)
    sd = {
        "cls_token": flat["tokenizer/cls_token"],
        "pos_embed": pos,
        "patch_embed.proj.weight": np.transpose(flat["tokenizer/proj/kernel"], (3, 2, 0, 1)),
        "patch_embed.proj.bias": flat["tokenizer/proj/bias"],
    }
    for i in range(spec.depth):
        for suffix, ours, transpose in _BLOCK_KEYS:
            v = flat[f"encoder/blocks_{i}/{ours}"]
            sd[_BLOCK.format(i=i) + suffix] = v.T if transpose else v
    sd["student_encoder.norm.weight"] = flat["encoder/norm/scale"]
    sd["student_encoder.norm.bias"] = flat["encoder/norm/bias"]
    if "head/kernel" in flat:
        sd["head.weight"], sd["head.bias"] = flat["head/kernel"].T, flat["head/bias"]
        sd["head_norm.running_mean"], sd["head_norm.running_var"] = flat["head/norm_mean"], flat["head/norm_var"]
    if "probe/kernel" in flat:
        sd.update({"probe.weight": flat["probe/kernel"].T, "probe.bias": flat["probe/bias"]})
    _training_to_torch(flat, sd, grid_f, grid_t)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def _blocks_to_torch(flat: dict, ours: str, torch_prefix: str, sd: dict) -> None:
    i = 0
    while f"{ours}/blocks_{i}/norm1/scale" in flat:
        for suffix, name, transpose in _BLOCK_KEYS:
            v = flat[f"{ours}/blocks_{i}/{name}"]
            sd[f"{torch_prefix}{i}.{suffix}"] = v.T if transpose else v
        i += 1


def _cls_head_to_torch(flat: dict, ours: str, prefix: str, sd: dict) -> None:
    for i in (0, 2, 4):
        sd[f"{prefix}mlp.{i}.weight"], sd[f"{prefix}mlp.{i}.bias"] = (
            flat[f"{ours}/mlp_{i}/kernel"].T,
            flat[f"{ours}/mlp_{i}/bias"],
        )
    sd[f"{prefix}last_layer.weight_g"] = flat[f"{ours}/weight_g"][:, None]
    sd[f"{prefix}last_layer.weight_v"] = flat[f"{ours}/weight_v"].T


def _training_to_torch(flat: dict, sd: dict, grid_f: int, grid_t: int) -> None:
    """The inverse of ``_map_training`` for whichever training groups ``flat`` holds."""
    if "predictor/embed/kernel" in flat:
        sd["decoder.decoder_embed.weight"] = flat["predictor/embed/kernel"].T
        sd["decoder.decoder_embed.bias"] = flat["predictor/embed/bias"]
        sd["decoder.mask_token"] = flat["predictor/mask_token"]
        sd["decoder.decoder_pos_embed"] = _pos_table(flat["predictor/embed/bias"].shape[0], grid_f, grid_t)
        _blocks_to_torch(flat, "predictor/trunk", "decoder.decoder_blocks.", sd)
        sd["decoder.decoder_norm.weight"] = flat["predictor/trunk/norm/scale"]
        sd["decoder.decoder_norm.bias"] = flat["predictor/trunk/norm/bias"]
        k = 0
        while f"predictor/heads_{k}/kernel" in flat:
            k += 1
        heads = [(f"predictor/heads_{i}", f"mcl_heads.mcl_heads.{i}") for i in range(k)]
        if k == 1 and "predictor/decoder_pred/kernel" not in flat:
            heads = [("predictor/heads_0", "decoder.decoder_pred")]  # MATPAC: the decoder's own prediction layer
        elif "predictor/decoder_pred/kernel" in flat:
            heads.append(("predictor/decoder_pred", "decoder.decoder_pred"))
        for ours, name in heads:
            sd[f"{name}.weight"], sd[f"{name}.bias"] = flat[f"{ours}/kernel"].T, flat[f"{ours}/bias"]
    if "cls_head/weight_v" in flat:
        _cls_head_to_torch(flat, "cls_head", "cls_student_head.", sd)
    if "teacher/encoder/norm/scale" in flat:
        _blocks_to_torch(flat, "teacher/encoder", "_ema.blocks.", sd)
        sd["_ema.norm.weight"], sd["_ema.norm.bias"] = (
            flat["teacher/encoder/norm/scale"],
            flat["teacher/encoder/norm/bias"],
        )
    if "teacher/cls_head/weight_v" in flat:
        _cls_head_to_torch(flat, "teacher/cls_head", "_cls_head_ema.", sd)
    if "center" in flat:
        sd["cls_head_loss.center"] = flat["center"][None]


def check_output(path: str, directory: bool) -> None:
    """Raise ``ConversionError`` unless ``path`` can be written as a directory (``directory``) or a file. Nothing is
    created."""
    why = unwritable_reason(path, directory)
    if why:
        raise ConversionError(f"cannot write {path}: {why}; choose another path")


def save_encoder(encoder: Encoder, directory: str) -> str:
    """``encoder.save`` into a temporary directory beside ``directory``, then moved into place: a new directory is
    renamed whole; in an existing one each file is replaced (weights first, ``model.json`` last), so a reader
    never sees a half-written file, and a failed conversion leaves the directory as it was."""
    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = f"{directory}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        encoder.save(tmp)
        if not os.path.exists(directory):
            os.rename(tmp, directory)
            return directory
        names = sorted(os.listdir(tmp), key=lambda n: (n == MODEL_FILE, n))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """The CLI; any unreadable, unsafe or unconvertible input, or an output that cannot be written, prints one
    ``error:`` line and returns 2, before anything is written."""
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.convert", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch-checkpoint", help="published state dict (.pt / .pth / .safetensors)")
    src.add_argument("--checkpoint", help="ours: an encoder directory, a training workdir or checkpoints/<step>")
    ap.add_argument("--output", help="encoder directory to write (with --torch-checkpoint)")
    ap.add_argument("--to-torch", help="state dict file to write (with --checkpoint)")
    ap.add_argument("--probe", help="a linear-probe state dict (probe.weight / probe.bias) to add")
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default: width / 64, 12 for ViT-B)")
    ap.add_argument("--encoder-only", action="store_true", help="convert a full training checkpoint's student encoder")
    args = ap.parse_args(argv)
    if args.torch_checkpoint and not args.output:
        ap.error("--torch-checkpoint needs --output=DIR")
    if args.checkpoint and not args.to_torch:
        ap.error("--checkpoint needs --to-torch=FILE")
    try:
        if args.torch_checkpoint:
            check_output(args.output, directory=True)
            refuse_other_kind(args.output, "vit")
            sd = read_state_dict(args.torch_checkpoint)
            if args.probe:
                sd |= read_state_dict(args.probe)
            notes: list[str] = []
            spec, params, left = from_torch(sd, heads=args.heads, encoder_only=args.encoder_only, notes=notes)
            save_encoder(Encoder(spec, params), args.output)
            for note in notes:
                print(note)
            extra = f"; left out {len(left)} training-only keys" if left else ""
            vit = f"ViT {spec.depth}x{spec.dim}, {spec.crop_frames}-frame chunks"
            print(f"wrote {args.output}: {vit}, groups {sorted(params)}{extra}")
        else:
            check_output(state_dict_path(args.to_torch), directory=False)
            enc = load_encoder(args.checkpoint)
            path = write_state_dict(args.to_torch, to_torch(enc.spec, jax_to_numpy(enc.params)))
            print(f"wrote {path}")
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def jax_to_numpy(tree):
    import jax

    return jax.tree.map(np.asarray, jax.device_get(tree))


if __name__ == "__main__":
    sys.exit(main())
