"""Config helpers: `file.py:variant,key=value` arguments, sibling config files, checks before any compute."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections as mlc

from matpac_jax.trees import flatten


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


def check_number(config, path: str, ok, expected: str) -> None:
    """ConfigError naming ``config.<path>`` when its value is not a finite number passing ``ok``."""
    value = _number(config, path)
    if value is None:
        return
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if not bad:
        bad = not math.isfinite(value) or not ok(value)
    if bad:
        raise ConfigError(f"config.{path}={value!r}: expected {expected}")


def check_int(config, path: str, low: int) -> None:
    """ConfigError naming ``config.<path>`` when its value is not an integer >= ``low``."""
    value = _number(config, path)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise ConfigError(f"config.{path}={value!r}: expected an integer >= {low}")


def check_numbers(config, table: dict) -> None:
    """``check_number`` for each {path: (ok, expected)} of a table."""
    for path, (ok, expected) in table.items():
        check_number(config, path, ok, expected)


POSITIVE = (lambda v: v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: v >= 0, "a finite number >= 0")
UNIT_CLOSED = (lambda v: 0 <= v <= 1, "a number in [0, 1]")
UNIT_HALF_OPEN = (lambda v: 0 <= v < 1, "a number in [0, 1)")

# Numeric settings of the update: a NaN / Inf / out-of-range value here poisons every step.
OPTIM_CHECKS = {
    "optim.lr": NON_NEGATIVE,
    "optim.b1": UNIT_HALF_OPEN,
    "optim.b2": UNIT_HALF_OPEN,
    "optim.eps": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.clip_norm": POSITIVE,
    "optim.reference_batch": POSITIVE,
    "optim.final_lr_factor": NON_NEGATIVE,
    "optim.layer_decay": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
}
NON_NEGATIVE_INTS = (
    "data.workers",
    "data.device_prefetch",
    "optim.warmup_steps",
    "optim.ramp_down_start",
    "optim.ramp_down_steps",
)


def check_config(config) -> None:
    """Raise ``ConfigError`` naming the key for what every training config shares and cannot run with: non-positive
    sizes, a mesh axis that is neither >= 1 nor -1, a NaN / Inf or out-of-range optimizer setting, a front-end that
    cannot be built. Only the config is read: nothing is computed. A method checks its own keys (``Task.check``)."""
    check_int(config, "seed", 0)
    if config.seed >= 2**31:
        raise ConfigError(f"config.seed={config.seed}: expected an integer in [0, 2**31)")
    for key in ("total_steps", "log_every", "nonfinite_max_skips", "data.batch_size", "optim.accum_steps"):
        check_int(config, key, 1)
    for key in NON_NEGATIVE_INTS:
        check_int(config, key, 0)
    for axis, size in config.mesh.items():
        if axis == "dcn_data":
            check_int(config, "mesh.dcn_data", 1)
        elif isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
            raise ConfigError(f"config.mesh.{axis}={size!r}: expected a size >= 1, or -1 for the remaining devices")
    check_numbers(config, OPTIM_CHECKS)
    check_number(config, "stall_timeout_s", NON_NEGATIVE[0], "a number of seconds >= 0 (0: no stall watch)")
    if "audio" not in config:  # a method without audio (tests/test_toy_task.py)
        return
    from matpac_jax.audio.frontend import LogMelConfig

    try:
        LogMelConfig.from_audio_config(config.audio)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.audio: {e}") from None


# --- Resume: what may differ between the config that saved a checkpoint and the one that resumes it.

# Keys (or key prefixes, ending in '.') of every run that may change on resume: run length and logging, checkpointing,
# the hardware layout, input locations. A method adds its own (``Task.resume_may_change``: e.g. implementation choices
# that leave the state's layout and the step unchanged).
RESUME_MAY_CHANGE = (
    "total_steps", "log_every", "profile_steps", "nonfinite", "nonfinite_max_skips", "stall_timeout_s", "checkpoint.",
    "mesh.", "probe.", "data.train", "data.workers", "data.device_prefetch", "optim.accum_steps",
    "data.tfds_data_dir",  # the prepared tfds dataset moved (its name, split and contents may not change)
)  # fmt: skip


def resume_differences(saved: dict, config, may_change: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for each key both configs hold whose value differs and that may not change on
    resume (``RESUME_MAY_CHANGE``, what every run may change; ``may_change``, the method's own keys, its task's
    ``resume_may_change``; and ``config.checkpoint.allow_changes``, a comma-separated list of keys or 'prefix.' the
    user accepts changing). Keys only one side holds (added or removed by another version) are skipped."""
    extra = str(config.checkpoint.allow_changes).split(",")
    accepted = tuple(k.strip().removeprefix("config.") for k in extra if k.strip())
    allowed = RESUME_MAY_CHANGE + tuple(may_change) + accepted
    as_read = lambda v: list(v) if isinstance(v, tuple | list) else v  # noqa: E731  (a sequence as JSON reads back)
    new = flatten(json.loads(json.dumps(config.to_dict())), ".", as_read)
    old = flatten(saved, ".", as_read)
    may_change = lambda k: any(k == a or (a.endswith(".") and k.startswith(a)) for a in allowed)  # noqa: E731
    return [(k, old[k], new[k]) for k in sorted(new.keys() & old.keys()) if old[k] != new[k] and not may_change(k)]
