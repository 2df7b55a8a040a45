"""Config helpers: `file.py:variant,key=value` arguments, sibling config files, checks before any compute."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections as mlc


class ConfigError(ValueError):
    """A config or environment problem found before any compute; the message names the key and the fix.
    ``python -m matpac_jax.main`` prints it and exits 2."""


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """Parse 'demo,batch=64' into a ConfigDict over `defaults` (whose types coerce the values).

    A bare word sets `variant` when defaults has that key, else is a boolean flag. Unknown keys fail with the key named.
    """
    out = mlc.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep:
            if "variant" in defaults and key not in defaults:
                out.variant = key
                continue
            value = "True"
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def sibling_module(here: str, name: str):
    """The module of the file ``name`` next to the file ``here`` (configs/ is not a package: its files are loaded by
    path, so that a config works from any working directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(here)), name)
    spec = importlib.util.spec_from_file_location(f"_config_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(here: str, name: str, arg: str | None) -> mlc.ConfigDict:
    """get_config(arg) of the config file `name` next to the file `here`."""
    return sibling_module(here, name).get_config(arg)


# --- Checks of a training config, before any data is read or anything is compiled.


def _number(config, path: str):
    """The value at dotted ``path`` (None when a config saved by an older version lacks it)."""
    node = config
    for part in path.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


FINETUNE_POSITIONS = ("pretrained", "sincos")  # finetune/model.py: the encoder's table moved as m2d does, or sin-cos


def _check(config, path: str, ok, expected: str) -> None:
    value = _number(config, path)
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if not bad:
        bad = not math.isfinite(value) or not ok(value)
    if bad:
        raise ConfigError(f"config.{path}={value!r}: expected {expected}")


def _int_at_least(config, path: str, low: int) -> None:
    value = _number(config, path)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConfigError(f"config.{path}={value!r}: expected an integer >= {low}")


_POSITIVE = (lambda v: v > 0, "a finite number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
_UNIT_CLOSED = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
_UNIT_HALF_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")

# Numeric settings of the update: a NaN / Inf / out-of-range value here poisons every step.
OPTIM_CHECKS = {
    "optim.lr": _NON_NEGATIVE,
    "optim.b1": _UNIT_HALF_OPEN,
    "optim.b2": _UNIT_HALF_OPEN,
    "optim.eps": _NON_NEGATIVE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.clip_norm": _POSITIVE,
    "optim.reference_batch": _POSITIVE,
    "optim.final_lr_factor": _NON_NEGATIVE,
    "optim.layer_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
}
OBJECTIVE_CHECKS = {
    "objective.mask_ratio": (lambda v: 0 < v < 1, "a number in (0, 1): some tokens visible, some masked"),
    "objective.mcl_temp_init": _POSITIVE,
    "objective.mcl_temp_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "objective.mcl_hard_below": _NON_NEGATIVE,
    "objective.student_temp": _POSITIVE,
    "objective.teacher_temp_warmup": _POSITIVE,
    "objective.teacher_temp": _POSITIVE,
    "objective.center_momentum": _UNIT_CLOSED,
    "objective.weight_pred": _NON_NEGATIVE,
    "objective.weight_cls": _NON_NEGATIVE,
    "objective.ema_start": _UNIT_CLOSED,
    "objective.ema_end": _UNIT_CLOSED,
    "objective.head_ema_start": _UNIT_CLOSED,
    "objective.head_ema_end": _UNIT_CLOSED,
}
COMPUTE_DTYPES = ("float32", "bfloat16")  # config.student.dtype: what the student computes in
DISTILL_CHECKS = {
    "distill.temperature": _POSITIVE,
    "distill.mixup": _NON_NEGATIVE,
    "student.width": _POSITIVE,
    "student.dropout": _UNIT_HALF_OPEN,
    "audio.seconds": _POSITIVE,
}


def check_config(config) -> None:
    """Raise ``ConfigError`` naming the key for a training config (``task`` 'pretrain' or 'distill') that cannot run:
    non-positive sizes, a mesh axis that is neither >= 1 nor -1, a model geometry that does not tile, a NaN / Inf or
    out-of-range optimizer or objective setting. Only the config is read: nothing is computed."""
    _int_at_least(config, "seed", 0)
    if config.seed >= 2**31:
        raise ConfigError(f"config.seed={config.seed}: expected an integer in [0, 2**31)")
    for key in ("total_steps", "log_every", "nonfinite_max_skips", "data.batch_size", "optim.accum_steps"):
        _int_at_least(config, key, 1)
    for key in ("data.workers", "data.device_prefetch", "optim.warmup_steps", "optim.ramp_down_start",
                "optim.ramp_down_steps", "objective.teacher_temp_warmup_steps"):  # fmt: skip
        _int_at_least(config, key, 0)
    for axis, size in config.mesh.items():
        if axis == "dcn_data":
            _int_at_least(config, "mesh.dcn_data", 1)
        elif isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ConfigError(f"config.mesh.{axis}={size!r}: expected a size >= 1, or -1 for the remaining devices")
    for path, (ok, expected) in OPTIM_CHECKS.items():
        _check(config, path, ok, expected)
    from matpac_jax.audio.frontend import LogMelConfig

    try:
        LogMelConfig.from_audio_config(config.audio)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.audio: {e}") from None
    if config.task == "pretrain":
        _check_pretrain(config)
    elif config.task == "finetune":
        _check_vit(config)
        f = config.finetune
        _int_at_least(config, "finetune.num_classes", 1)
        for key in ("finetune.freq_mask", "finetune.time_mask", "finetune.time_shift", "finetune.eval_every",
                    "finetune.bootstrap"):  # fmt: skip
            _int_at_least(config, key, 0)
        _check(config, "finetune.mixup", *_NON_NEGATIVE)
        if f.positions not in FINETUNE_POSITIONS:
            raise ConfigError(f"config.finetune.positions={f.positions!r}: expected one of {FINETUNE_POSITIONS}")
        if config.data.source not in ("records", "demo"):
            raise ConfigError(
                f"config.data.source={config.data.source!r}: fine-tuning reads labelled 'records' or 'demo'"
            )
        if config.data.source == "records" and not (config.data.train and f.eval):
            raise ConfigError(
                "fine-tuning on records needs --config.data.train=SHARDS and --config.finetune.eval=SHARDS (the "
                "evaluation set, read in full)"
            )
        if config.data.batch_size < 2:
            raise ConfigError("config.data.batch_size must be >= 2: the head's BatchNorm uses the batch's statistics")
    elif config.task == "distill":
        for path, (ok, expected) in DISTILL_CHECKS.items():
            _check(config, path, ok, expected)
        if config.data.source != "records" or config.optim.accum_steps != 1:
            raise ConfigError(
                f"config.data.source={config.data.source!r}, config.optim.accum_steps={config.optim.accum_steps}: "
                "distillation reads the teacher pass's record shards (data.source='records') without accumulation (1)"
            )
        if config.student.dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"config.student.dtype={config.student.dtype!r}: choose one of {', '.join(COMPUTE_DTYPES)}"
            )


DATA_SOURCES = ("records", "tfds", "demo")


def _check_vit(config) -> None:
    """The ViT's geometry: patch, mel bins and crop a multiple of it, widths divisible by the heads; the attention."""
    m, a = config.model, config.audio
    from matpac_jax.models.vit import ATTN_IMPLS

    if m.attn_impl not in ATTN_IMPLS:
        raise ConfigError(f"config.model.attn_impl={m.attn_impl!r}: choose one of {', '.join(map(repr, ATTN_IMPLS))}")
    _int_at_least(config, "model.patch", 1)
    for key in ("n_mels", "crop_frames"):
        if a[key] < m.patch or a[key] % m.patch:
            raise ConfigError(
                f"config.audio.{key}={a[key]}: must be a positive multiple of config.model.patch={m.patch} (the "
                "log-mel is cut into patch x patch tokens)"
            )
    for trunk in ("encoder", "predictor"):
        if trunk not in m:
            continue
        for key in ("dim", "depth", "heads"):
            _int_at_least(config, f"model.{trunk}.{key}", 1)
        t = m[trunk]
        if t.dim % t.heads:
            raise ConfigError(
                f"config.model.{trunk}.heads={t.heads} does not divide config.model.{trunk}.dim={t.dim}: choose a "
                "divisor of the width"
            )
        _check(config, f"model.{trunk}.mlp_ratio", *_POSITIVE)


def _check_pretrain(config) -> None:
    m, a = config.model, config.audio
    source = config.data.source
    if source not in DATA_SOURCES:
        raise ConfigError(f"config.data.source={source!r}: expected one of {', '.join(map(repr, DATA_SOURCES))}")
    if source == "tfds" and not config.data.tfds_name:
        raise ConfigError(
            "config.data.tfds_name is empty: with config.data.source='tfds' name the prepared dataset, e.g. "
            "--config.data.tfds_name=my_audio:1.0.0 --config.data.tfds_data_dir=/data/tfds"
        )
    _check_vit(config)
    for key in ("mcl_heads", "cls_head.hidden", "cls_head.bottleneck", "cls_head.prototypes"):
        _int_at_least(config, f"model.{key}", 1)
    for path, (ok, expected) in OBJECTIVE_CHECKS.items():
        _check(config, path, ok, expected)
    tokens = (a.n_mels // m.patch) * (a.crop_frames // m.patch)
    visible = int(tokens * (1 - config.objective.mask_ratio))
    if not 0 < visible < tokens:
        raise ConfigError(
            f"config.objective.mask_ratio={config.objective.mask_ratio} leaves {visible} of {tokens} tokens visible: "
            "both the visible and the masked set must be non-empty"
        )


# --- Resume: what may differ between the config that saved a checkpoint and the one that resumes it.

# Keys (or key prefixes, ending in '.') that may change on resume: run length and logging, checkpointing, the
# hardware layout, input locations and implementation choices that leave the state's layout and the step unchanged.
RESUME_MAY_CHANGE = (
    "total_steps", "log_every", "profile_steps", "nonfinite", "nonfinite_max_skips", "checkpoint.", "mesh.", "probe.",
    "data.train", "data.workers", "data.device_prefetch", "teacher.checkpoint", "teacher.embeddings",
    "model.attn_impl", "model.remat", "model.attn_pad_to", "model.scan_layers", "optim.accum_steps",
    "data.tfds_data_dir",  # the prepared tfds dataset moved (its name, split and contents may not change)
)  # fmt: skip


def flatten(tree, prefix: str = "") -> dict:
    """{'a.b.c': value} of nested dicts (lists and tuples as lists: how a config reads back from JSON)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple | list) else value
    return out


def resume_differences(saved: dict, config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each key both configs hold whose value differs and that may not change on
    resume (``RESUME_MAY_CHANGE`` and ``config.checkpoint.allow_changes``, a comma-separated list of keys or
    'prefix.' the user accepts changing). Keys only one side holds (added or removed by another version) are skipped."""
    extra = str(config.checkpoint.allow_changes).split(",")
    allowed = RESUME_MAY_CHANGE + tuple(k.strip().removeprefix("config.") for k in extra if k.strip())
    new = flatten(json.loads(json.dumps(config.to_dict())))
    old = flatten(saved)
    may_change = lambda k: any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)  # noqa: E731
    return [(k, old[k], new[k]) for k in sorted(new.keys() & old.keys()) if old[k] != new[k] and not may_change(k)]
