r"""Convert between the published PyTorch state dicts (SPEC §5 key names) and this package's encoders.

    python -m matpac_jax.convert --torch-checkpoint=matpac_plus_6s_2048_enconly.pt --output=models/pp
    python -m matpac_jax.convert --torch-checkpoint=as_ft_with_head.pt --output=models/pp_as      # + 527-class head
    python -m matpac_jax.convert --torch-checkpoint=enc.pt --probe=esc50.pth --output=models/pp_esc50
    python -m matpac_jax.convert --checkpoint=runs/pp --to-torch=pp.pt     # ours -> published layout (.pt with
                                                                           # torch installed, else .safetensors)

Keys read (every key of the file must be one of these, or the conversion fails listing the others):

- encoder: ``cls_token`` [1,1,D], ``pos_embed`` [1,1+F·T,D] (the fixed 2-D sin-cos table, checked, not stored),
  ``patch_embed.proj.weight`` [D,1,16,16] + ``.bias``, ``student_encoder.blocks.{i}.norm1|norm2.weight|bias``,
  ``...attn.qkv.weight`` [3D,D] (rows q;k;v) + ``.bias``, ``...attn.proj.weight|bias``, ``...mlp.fc1.weight|bias``,
  ``...mlp.fc2.weight|bias``, ``student_encoder.norm.weight|bias``;
- AudioSet fine-tuned head: ``head_norm.running_mean|running_var|num_batches_tracked`` (BatchNorm1d without affine),
  ``head.weight`` [527,D], ``head.bias`` (with 992-frame positions: pos_embed [1,311,D]);
- a linear probe (``--probe`` file or in the same file): ``probe.weight`` [C,F·D], ``probe.bias``.

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
import json
import os
import re
import shutil
import struct
import sys
import uuid

import numpy as np

from matpac_jax.audio.frontend import LogMelConfig
from matpac_jax.fileio import TMP_MARK, atomic_write, unwritable_reason
from matpac_jax.inference import Encoder, EncoderSpec, load_encoder
from matpac_jax.models.vit import sincos_pos_embed_2d

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


class ConversionError(ValueError):
    """Keys missing, unknown or of the wrong shape; the message lists them."""


def _pos_table(dim: int, grid_f: int, grid_t: int) -> np.ndarray:
    return sincos_pos_embed_2d(dim, grid_f, grid_t, cls_row=True).astype(np.float32)[None]


def from_torch(
    sd: dict[str, np.ndarray], heads: int | None = None, n_mels: int = 80, encoder_only: bool = False
) -> tuple[EncoderSpec, dict, list[str]]:
    """Published state dict (numpy arrays) -> (spec, params, training-only keys left out). Strict about keys."""
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
    spec = EncoderSpec(dim, depth, heads, sd[f"{_BLOCK.format(i=0)}mlp.fc1.weight"].shape[0] / dim, patch, n_mels,
                       grid_t * patch, LogMelConfig())  # fmt: skip
    table = _pos_table(dim, grid_f, grid_t)
    err = float(np.max(np.abs(sd["pos_embed"] - table)))
    if err > 1e-5:
        raise ConversionError(f"pos_embed differs from the 2-D sin-cos table by {err:.2e}: not a fixed-position model")

    used = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    flat = {
        "tokenizer/cls_token": sd["cls_token"],
        "tokenizer/proj/kernel": np.transpose(sd["patch_embed.proj.weight"], (2, 3, 1, 0)),  # [D,1,f,t] -> [f,t,1,D]
        "tokenizer/proj/bias": sd["patch_embed.proj.bias"],
    }
    problems: list[str] = []
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
    from matpac_jax.inference import unflatten

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
    from matpac_jax.inference import flatten

    flat = flatten(params)
    grid_f, grid_t = spec.n_mels // spec.patch, spec.crop_frames // spec.patch
    sd = {
        "cls_token": flat["tokenizer/cls_token"],
        "pos_embed": _pos_table(spec.dim, grid_f, grid_t),
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


# --- Files: .pt (torch) and .safetensors (written and read here, no dependency).

# safetensors dtype -> numpy dtype read from the file (little-endian); every tensor is returned as float32.
_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?",
}  # fmt: skip
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is not a state dict of this model family


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors layout: u64 header length, JSON header {name: dtype, shape, data_offsets}, raw data.
    Written atomically: ``path`` is either the complete new file or left as it was."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], np.float32)
        blobs.append(a.tobytes())
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(text)) + text)
        for b in blobs:
            f.write(b)

    atomic_write(path, write)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as float32. Raises ``ConversionError`` naming the file and the problem
    for any malformed file (header length, header JSON, dtype, shape, offsets, truncated or trailing data)."""
    with open(path, "rb") as f:
        data = f.read()
    bad = lambda why: ConversionError(f"{path}: not a valid safetensors file: {why}")  # noqa: E731
    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", data)
    if n > min(len(data) - 8, _MAX_HEADER):
        raise bad(f"header length {n} exceeds the {len(data) - 8} bytes that follow it")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad(f"the header is a JSON {type(header).__name__}, expected an object")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
    out, end = {}, 0
    for name, h in header.items():
        dtype, shape, (start, stop) = _check_entry(name, h, body, bad)
        raw = np.frombuffer(data, dtype, count=(stop - start) // dtype.itemsize, offset=8 + n + start)
        if h["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw.astype(np.float32).reshape(shape)
        end = max(end, stop)
    if end != body:
        raise bad(f"the tensors take {end} bytes but {body} bytes of data follow the header")
    return out


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup}")
    return dict(pairs)


def _check_entry(name: str, h, body: int, bad) -> tuple[np.dtype, tuple, tuple[int, int]]:
    """(numpy dtype, shape, (start, stop)) of one header entry, or ``bad(reason)`` raised."""
    if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise bad(f"tensor {name!r}: expected {{dtype, shape, data_offsets}}, got {h!r:.80}")
    if not isinstance(h["dtype"], str) or h["dtype"] not in _SAFETENSORS_DTYPES:
        raise bad(f"tensor {name!r} has dtype {h['dtype']!r:.40}; expected one of {sorted(_SAFETENSORS_DTYPES)}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[h["dtype"]])
    shape, offsets = h["shape"], h["data_offsets"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {name!r} has shape {shape!r:.80}; expected a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"tensor {name!r} has data_offsets {offsets!r:.80}; expected [start, stop]")
    start, stop = offsets
    if not 0 <= start <= stop <= body:
        raise bad(f"tensor {name!r}: data_offsets [{start}, {stop}] are outside the {body} data bytes (truncated?)")
    if stop - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise bad(f"tensor {name!r}: {stop - start} bytes do not hold a {h['dtype']} tensor of shape {shape}")
    return dtype, tuple(shape), (start, stop)


def _safe_globals() -> list:
    """What a checkpoint may reference beyond tensors and containers (``torch.load(weights_only=True)``'s own
    allowlist): the plain data a fairseq training checkpoint holds besides ``model``: ``args``
    (``argparse.Namespace``) and numpy scalars (``numpy.dtype`` + ``numpy.core.multiarray.scalar``, written under
    either numpy 1 or numpy 2 module name) in its metrics."""
    import argparse

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1", "u1", "?")]
    return [argparse.Namespace, np.dtype, *dtype_classes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]  # fmt: skip


def pickle_globals(data: bytes) -> list[str]:
    """The globals (``module.name``) a pickle stream imports, found by reading its opcodes (nothing is executed)."""
    import pickletools

    names, strings, memo, last = [], [], {}, None
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            if isinstance(arg, str) and op.name.endswith(("UNICODE", "STRING", "UNICODE8")):
                strings.append(arg)
                last = arg
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = last
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                strings.append(memo[arg])
                last = memo[arg]
            elif op.name not in ("FRAME", "PROTO"):
                last = None
    except Exception:  # a truncated or corrupt stream: what was found so far
        pass
    return list(dict.fromkeys(names))


def _checkpoint_globals(path: str) -> list[str]:
    """The globals imported by a ``torch.save`` zip (its ``data.pkl``) or a raw pickle file, read without running it."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
                return pickle_globals(z.read(pkl[0])) if pkl else []
        with open(path, "rb") as f:
            return pickle_globals(f.read())
    except (OSError, zipfile.BadZipFile):
        return []


_RESAVE = (
    "if you trust the file, re-save its weights alone (python -c \"import torch; sd = torch.load('{path}', "
    "weights_only=False); torch.save(sd.get('model', sd), 'weights.pt')\") and convert that"
)


def _torch_load(path: str) -> dict:
    """``torch.load`` that can only build tensors and plain data: ``weights_only=True`` with the few extra globals of
    ``_safe_globals`` allowed for this call only. A file needing anything else raises ``ConversionError`` naming the
    refused global(s); nothing in it is executed."""
    import contextlib
    import pickle
    import warnings

    import torch

    scoped = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5; older: weights_only's defaults only
    try:
        with scoped(_safe_globals()) if scoped else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. about the pickle protocol: the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        allowed = {n for g in _safe_globals() for n in ([g[1]] if isinstance(g, tuple) else [_qualname(g)])}
        ours = ("torch.", "collections.")  # tensor rebuilding and containers: weights_only's own allowlist
        found = [g for g in _checkpoint_globals(path) if g not in allowed and not g.startswith(ours)]
        named = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch's message names the first refused global
        refused = list(dict.fromkeys(([named.group(1)] if named else []) + found))
        what = f"it needs {', '.join(refused[:5])}" if refused else f"it is not a plain state dict ({_last_line(e)})"
        raise ConversionError(
            f"{path}: refused to unpickle: {what}; only tensors and plain data are read, since unpickling other "
            f"objects can run code; {_RESAVE.format(path=path)}"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConversionError(f"{path}: not a readable PyTorch file: {_last_line(e)}") from None


def _qualname(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:200]


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays, from ``.safetensors`` (no dependency) or a PyTorch file (``torch.load`` with
    ``weights_only=True``: a file that needs anything but tensors and plain data is refused, never executed; without
    PyTorch installed a ``.pt`` file is refused, never unpickled). A fairseq checkpoint's weights (``model``) are
    returned. Raises ``ConversionError`` for any unreadable or unsafe file."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConversionError(
            f"reading {path} needs PyTorch: pip install 'matpac_jax[torch]' (or give a .safetensors file)"
        ) from None
    sd = _torch_load(path)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: expected a state dict, got {type(sd).__name__}")
    if "model" in sd and isinstance(sd["model"], dict):  # a fairseq training checkpoint: the weights are in 'model'
        sd = sd["model"]
    return flatten_nested(sd, lambda v: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v))


def flatten_nested(sd: dict, convert=np.asarray, prefix: str = "") -> dict[str, np.ndarray]:
    """{'_ema': {'blocks.0.x': t}} -> {'_ema.blocks.0.x': array}: the EMA teachers are nested dicts in the file."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, dict):
            out.update(flatten_nested(v, convert, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = convert(v)
    return out


def state_dict_path(path: str) -> str:
    """The file ``write_state_dict(path, ...)`` writes: ``path`` itself, or with ``.safetensors`` for its extension
    when it is not a ``.pt`` file or PyTorch is not installed."""
    import importlib.util

    if path.endswith(".safetensors") or (path.endswith(".pt") and importlib.util.find_spec("torch") is not None):
        return path
    return os.path.splitext(path)[0] + ".safetensors"


def write_state_dict(path: str, sd: dict[str, np.ndarray]) -> str:
    """``.pt`` with torch installed, else ``.safetensors`` (the path's extension is changed and returned). Written
    atomically: the returned path is either the complete new file or left as it was."""
    path = state_dict_path(path)
    if path.endswith(".pt"):
        import torch

        tensors, nested = {}, {}
        for k, v in sd.items():  # the EMA teachers go back into nested dicts, as the published files hold them
            group = k.split(".", 1)[0]
            target = nested.setdefault(group, {}) if group in ("_ema", "_cls_head_ema") else tensors
            target[k.split(".", 1)[1] if target is not tensors else k] = torch.from_numpy(np.array(v))
        atomic_write(path, lambda f: torch.save(tensors | nested, f))
        return path
    write_safetensors(path, sd)
    return path


def check_output(path: str, directory: bool) -> None:
    """Raise ``ConversionError`` unless ``path`` can be written as a directory (``directory``) or a file. Nothing is
    created."""
    why = unwritable_reason(path, directory)
    if why:
        raise ConversionError(f"cannot write {path}: {why}; choose another path")


def save_encoder(encoder: Encoder, directory: str) -> str:
    """``encoder.save`` into a temporary directory beside ``directory``, then moved into place: a new directory is
    renamed whole; in an existing one each file is replaced (parameters first, ``encoder.json`` last), so a reader
    never sees a half-written file, and a failed conversion leaves the directory as it was."""
    from matpac_jax.inference import ENCODER_FILE

    directory = os.path.abspath(directory)
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    tmp = f"{directory}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.mkdir(tmp)
    try:
        encoder.save(tmp)
        if not os.path.exists(directory):
            os.rename(tmp, directory)
            return directory
        names = sorted(os.listdir(tmp), key=lambda n: (n == ENCODER_FILE, n))
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
            sd = read_state_dict(args.torch_checkpoint)
            if args.probe:
                sd |= read_state_dict(args.probe)
            spec, params, left = from_torch(sd, heads=args.heads, encoder_only=args.encoder_only)
            save_encoder(Encoder(spec, params), args.output)
            extra = f"; left out {len(left)} training-only keys" if left else ""
            print(f"wrote {args.output}: ViT {spec.depth}x{spec.dim}, {spec.crop_frames}-frame chunks, "
                  f"groups {sorted(params)}{extra}")  # fmt: skip
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
