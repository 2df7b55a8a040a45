r"""Published student weights (PyTorch state dicts) -> this package's Flax students, with strict key accounting.

Two layouts are read (``convert.read_state_dict``: ``.pt`` / ``.pth`` / ``.ckpt`` with ``torch.load(weights_only=True)``
or ``.safetensors``; nothing in a file is executed):

- **EfficientAT** (``mn10_im.pt``, the ImageNet weights the paper's mn10 starts from; any ``models/mn`` state dict):
  the backbone's ``features.*`` keys; the ``classifier.*`` keys are dropped (S-SONDO's
  ``utils/student_models/MobileNetV3/model.py`` drops them and loads the rest strictly). No projection head.
- **S-SONDO** (the released students ``matpac_mobilenetv3.ckpt`` ...): a Lightning checkpoint whose ``state_dict``
  holds the ``ModelWrapper`` under ``student_model.``: the backbone under ``student_model.model.`` and the projection
  head ``student_model.classification_head.mlp.{0,3}.{weight,bias}`` (Linear d -> 1280, Hardswish, Dropout,
  Linear 1280 -> 3840). The checkpoint's ``training_config`` (its front-end and student) is read when present. The
  same keys without the ``state_dict.`` / ``student_model.`` prefixes are accepted too (a re-saved state dict).

Every other key fails, and so does every key the student needs that the file lacks: ``StateDictMismatch`` lists both
by name (``num_batches_tracked`` may be present or not). The mobilenet backbone is mapped here; ERes2Net and DyMN by
``models.eres2net`` / ``models.dymn`` ``from_torch_state_dict``.

    python -m matpac_jax.distill.published --input=mn10_im.pt --arch=mn10 --output=students/mn10_im
    python -m matpac_jax.distill.published --input=matpac_mobilenetv3.ckpt --arch=mn10 --output=students/mn10

write a student directory (``models.student.save_student``'s format: ``Student.load``, the probe and
``distill.export`` read it) with ``--config``'s (default configs/ssondo.py) student and front-end sections, the
front-end taken from the checkpoint's ``training_config`` when it has one. ``--config.student.init_from=FILE`` starts
a distillation from the file's weights (backbone; projection head too when its shapes fit): the file is read and
checked when the run builds its state, resumed runs included, and used only when the state is initialised.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
from types import SimpleNamespace

import jax
import ml_collections as mlc
import numpy as np
from flax import traverse_util

from matpac_jax import convert
from matpac_jax.config_lib import ConfigError, load_config_file
from matpac_jax.convert import ConversionError, check_output
from matpac_jax.models import dymn, eres2net
from matpac_jax.models.student import Student, save_student
from matpac_jax.models.students import LARGE, MobileNetV3, count_params, make_divisible
from matpac_jax.saved_model import refuse_other_kind
from matpac_jax.state_dict_io import StateDictMismatch

# --- EfficientAT's mn backbone (models/mn/model.py MN.features, block_types.py InvertedResidual).

_BN = (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
)


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))  # torch [out, in / groups, kh, kw] -> flax [kh, kw, in / groups, out]


def _linear_as_1x1(w: np.ndarray) -> np.ndarray:
    return w.T[None, None]  # torch Linear [out, in] -> flax 1×1 Conv [1, 1, in, out]


def mobilenet_key_map(width: float = 1.0) -> dict[str, tuple[str, str, object]]:
    """torch key -> (collection, flax path 'a/b/c', transform or None) of ``MobileNetV3(width)``: ``features.0`` the
    stem (``.0`` conv, ``.1`` BatchNorm), ``features.{i+1}.block.{j}`` block i's layers in order (expansion when the
    width changes, depthwise, squeeze-excitation ``conc_se_layers.0.fc1|fc2`` when the block has one, projection),
    ``features.16`` the last 1×1 convolution. ``num_batches_tracked`` keys are not listed (accepted and dropped)."""
    out: dict[str, tuple[str, str, object]] = {}

    def conv_bn(torch_prefix: str, ours: str) -> None:
        out[f"{torch_prefix}.0.weight"] = ("params", f"{ours}/conv/kernel", _conv_kernel)
        for suffix, collection, name in _BN:
            out[f"{torch_prefix}.1.{suffix}"] = (collection, f"{ours}/bn/{name}", None)

    conv_bn("features.0", "stem")
    channels = make_divisible(16 * width)
    for i, (_, e, o, se, _, _) in enumerate(LARGE):
        expanded, j, prefix = make_divisible(e * width), 0, f"features.{i + 1}.block"
        layers = (["expand"] if expanded != channels else []) + ["depthwise"] + (["se"] if se else []) + ["project"]
        for j, layer in enumerate(layers):
            if layer == "se":
                for fc in ("fc1", "fc2"):
                    kernel = f"block_{i}/se/{fc}/kernel"
                    out[f"{prefix}.{j}.conc_se_layers.0.{fc}.weight"] = ("params", kernel, _linear_as_1x1)
                    out[f"{prefix}.{j}.conc_se_layers.0.{fc}.bias"] = ("params", f"block_{i}/se/{fc}/bias", None)
            else:
                conv_bn(f"{prefix}.{j}", f"block_{i}/{layer}")
        channels = make_divisible(o * width)
    conv_bn(f"features.{len(LARGE) + 1}", "last")
    return out


def _template(module, n_mels: int = 64, frames: int = 64) -> dict[str, tuple[str, tuple]]:
    """'collection/path' -> shape of ``module``'s variables (jax.eval_shape: nothing is compiled)."""
    import jax.numpy as jnp

    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, n_mels, frames))))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
        for path, v in jax.tree_util.tree_leaves_with_path(shapes)
    }


def mobilenet_from_torch_state_dict(sd: dict[str, np.ndarray], width: float = 1.0) -> dict:
    """EfficientAT mn backbone state dict (``features.*``; no classifier) -> ``MobileNetV3(width)`` variables
    ``{'params', 'batch_stats'}`` (float32). Raises ``StateDictMismatch`` listing unknown and missing keys, and the
    keys whose shapes do not fit ``MobileNetV3(width)``."""
    keys = mobilenet_key_map(width)
    tracked = {k.rsplit(".", 1)[0] + ".num_batches_tracked" for k in keys if k.endswith(".running_mean")}
    unknown = [k for k in sd if k not in keys and k not in tracked]
    missing = [k for k in keys if k not in sd]
    what = f"EfficientAT mn backbone (width {width})"
    if unknown or missing:
        raise StateDictMismatch(what, unknown, missing)
    template = _template(MobileNetV3(width))
    flat, wrong = {}, []
    for key, (collection, path, transform) in keys.items():
        value = np.asarray(sd[key], np.float32)
        value = transform(value) if transform else value
        want = template[f"{collection}/{path}"]
        if value.shape != want:
            wrong.append(f"{key} {tuple(np.shape(sd[key]))} (the student needs {want} as {collection}/{path})")
        flat[f"{collection}/{path}"] = value
    if wrong or len(flat) != len(template):
        absent = sorted(set(template) - set(flat))
        raise StateDictMismatch(what, detail=f"wrong shapes: {wrong}" + (f"; not filled: {absent}" if absent else ""))
    return traverse_util.unflatten_dict(flat, sep="/")


# --- Layouts: EfficientAT (features.* + classifier.*) or S-SONDO's Lightning checkpoint (student_model.*).

HEAD_KEYS = {
    "mlp.0.weight": ("fc1", "kernel"),
    "mlp.0.bias": ("fc1", "bias"),
    "mlp.3.weight": ("fc2", "kernel"),
    "mlp.3.bias": ("fc2", "bias"),
}


def split_published(sd: dict[str, np.ndarray]) -> dict:
    """A published state dict -> {'layout': 'plain' (EfficientAT's) | 'ssondo', 'backbone': {key: array} (prefixes
    removed), 'head': {mlp key: array} or None, 'dropped': [keys left out], 'training_config': {dotted key: value}
    (S-SONDO checkpoints; else {})}. A Lightning checkpoint's metadata (everything outside ``state_dict``) is not
    weights."""
    sd = dict(sd)
    training_config = {}
    if any(k.startswith("state_dict.") for k in sd):  # a Lightning checkpoint, flattened by read_state_dict
        training_config = {k[len("training_config.") :]: v for k, v in sd.items() if k.startswith("training_config.")}
        sd = {k[len("state_dict.") :]: v for k, v in sd.items() if k.startswith("state_dict.")}
    ssondo = [p for p in ("student_model.", "") if any(k.startswith(f"{p}model.") for k in sd)]
    if not ssondo:
        dropped = sorted(k for k in sd if k.startswith("classifier."))  # EfficientAT's classifier (mn10_im.pt)
        backbone = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        return {
            "layout": "plain",
            "backbone": backbone,
            "head": None,
            "dropped": dropped,
            "training_config": training_config,
        }
    prefix = ssondo[0]
    body, head_prefix = f"{prefix}model.", f"{prefix}classification_head."
    unknown = [k for k in sd if not k.startswith((body, head_prefix))]
    head = {k[len(head_prefix) :]: v for k, v in sd.items() if k.startswith(head_prefix)}
    unknown += [head_prefix + k for k in head if k not in HEAD_KEYS]
    missing = [head_prefix + k for k in HEAD_KEYS if k not in head]
    if unknown or missing:
        head_keys = "'student_model.classification_head.mlp.{0,3}.{weight,bias}'"
        detail = f"expected the backbone under 'student_model.model.' and the projection head {head_keys}"
        raise StateDictMismatch("S-SONDO student checkpoint", unknown, missing, detail)
    backbone = {k[len(body) :]: v for k, v in sd.items() if k.startswith(body)}
    return {"layout": "ssondo", "backbone": backbone, "head": head, "dropped": [], "training_config": training_config}


def head_from_torch(head: dict[str, np.ndarray]) -> dict:
    """S-SONDO's ``MLPClassifer.mlp`` (Linear, Hardswish, Dropout, Linear) -> ``ProjectionHead`` params."""
    out: dict = {}
    for key, (layer, name) in HEAD_KEYS.items():
        v = np.asarray(head[key], np.float32)
        out.setdefault(layer, {})[name] = v.T if name == "kernel" else v
    return out


# S-SONDO's student_model.model_name -> our arch (inference_ssondo/ssondo/model.py _build_student_model)
def _arch_of_model_name(name: str) -> str:
    return "dymn" if "dy" in name else "mobilenet" if "mn" in name else "eres2net"


def _config_value(training_config: dict, key: str):
    if key not in training_config:
        return None
    v = np.asarray(training_config[key])
    return v.item() if v.ndim == 0 else v.tolist()


def backbone_from_torch(arch: str, sd: dict[str, np.ndarray], student) -> dict:
    """Dispatch on ``arch``: mobilenet here; eres2net / dymn through their modules' ``from_torch_state_dict``
    (called with the ``student`` config entries that match its keyword parameters)."""
    if arch == "mobilenet":
        return mobilenet_from_torch_state_dict(sd, float(student.width))
    if arch == "eres2net":
        from_torch_state_dict = eres2net.from_torch_state_dict
    elif arch == "dymn":
        from_torch_state_dict = dymn.from_torch_state_dict
    else:
        raise ValueError(f"config.student.arch={arch!r}: published weights load into mobilenet, eres2net or dymn")
    params = inspect.signature(from_torch_state_dict).parameters
    kwargs = {k: student[k] for k in params if k != "sd" and k in student}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return from_torch_state_dict(sd, **kwargs)


def load_student_weights(path: str, student_config) -> dict:
    """A published file (either layout) -> the distiller's variables ``{'params': {'backbone', ['head']},
    'batch_stats': {'backbone'}}`` for ``student_config`` (``config.student``); 'head' only when the file has S-SONDO's
    projection head. Raises ``convert.ConversionError`` for an unreadable or unsafe file, ``StateDictMismatch`` for
    keys that do not match, ``ValueError`` when an S-SONDO checkpoint's ``training_config`` names another student."""
    return _load(path, student_config)[0]


def _load(path: str, student_config) -> tuple[dict, dict]:
    try:
        parts = split_published(convert.read_state_dict(path))
    except StateDictMismatch as e:
        raise StateDictMismatch(f"{path}: {e.what}", e.unknown, e.missing, e.detail) from None
    arch = student_config.arch
    name = _config_value(parts["training_config"], "student_model.model_name")
    if name is not None and _arch_of_model_name(str(name)) != arch:
        held = _arch_of_model_name(str(name))
        fix = "set config.student.arch / --arch accordingly"
        raise ValueError(f"{path} holds an S-SONDO {name!r} student ({held}), not {arch}: {fix}")
    try:
        backbone = backbone_from_torch(arch, parts["backbone"], student_config)
    except StateDictMismatch as e:
        removed = ", prefixes removed" if parts["layout"] == "ssondo" else ""
        what = f"{path} ({parts['layout']} layout{removed}) as {e.what}"
        raise StateDictMismatch(what, e.unknown, e.missing, e.detail) from None
    variables = {"params": {"backbone": backbone["params"]}, "batch_stats": {"backbone": backbone["batch_stats"]}}
    if parts["head"] is not None:
        variables["params"]["head"] = head_from_torch(parts["head"])
    return variables, parts


def frontend_of(training_config: dict) -> dict | None:
    """The audio section of an S-SONDO checkpoint's ``training_config`` (``student_model.sr`` and
    ``preprocess.logmelspec``: n_fft = win_length = round(sr · win_len), hop round(sr · hop_len), f_max None ->
    sr / 2, log(x + 1e-3), no normalisation; ``preprocess.slice_audio.win_len`` seconds), as ssondo's
    ``get_ssondo`` builds its LogMelSpectrogram; None without one."""
    get = lambda k: _config_value(training_config, k)  # noqa: E731
    log_mel = "preprocess.logmelspec."
    if any(get(k) is None for k in ("student_model.sr", log_mel + "win_len", log_mel + "hop_len")):
        return None
    sr, win, hop = (_number(get, k) for k in ("student_model.sr", log_mel + "win_len", log_mel + "hop_len"))
    n = int(np.round(sr * win))
    f_max, slice_s = get(log_mel + "f_max"), "preprocess.slice_audio.win_len"
    return dict(
        sample_rate=int(sr),
        n_fft=n,
        win_length=n,
        hop_length=int(np.round(sr * hop)),
        n_mels=int(_number(get, log_mel + "n_mels")),
        f_min=0.0 if get(log_mel + "f_min") is None else _number(get, log_mel + "f_min", zero_ok=True),
        f_max=float(int(sr) // 2) if f_max is None else _number(get, log_mel + "f_max"),
        log_offset=1e-3,
        norm_mean=None,
        norm_std=None,
        seconds=10.0 if get(slice_s) is None else _number(get, slice_s),
    )


def _number(get, key: str, zero_ok: bool = False) -> float:
    """A finite number > 0 (or >= 0 with ``zero_ok``) from an S-SONDO ``training_config``: ValueError naming the key
    otherwise (``sr=inf`` or ``sr="32k"`` cannot describe a front-end; the CLI exits 2 on it)."""
    value = get(key)
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(
            f"training_config {key}={value!r}: expected a finite number {'>=' if zero_ok else '>'} 0; the checkpoint's "
            "settings cannot describe the student's front-end (re-save it with S-SONDO's trainer)"
        )
    return float(value)


# --- Distillation from published weights (--config.student.init_from=FILE).


def _shapes(tree) -> dict[str, tuple]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(v))
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def initialise_from(student_config, abstract) -> dict:
    """The weights ``student_config.init_from`` holds, as the part of a DistillState they replace
    (``StepProgram.initial_weights``; train.initial_weights checks every shape against ``abstract`` and places
    them): the backbone's parameters and BatchNorm statistics, and the projection head when the file has one of this
    run's shapes. A file that cannot be read is a ``ConfigError`` naming it."""
    path = student_config.init_from
    try:
        loaded = load_student_weights(path, student_config)
    except (ConversionError, ValueError) as e:
        raise ConfigError(f"config.student.init_from={path}: {e}") from None
    weights = {collection: {"backbone": loaded[collection]["backbone"]} for collection in ("params", "batch_stats")}
    head = loaded["params"].get("head")
    if head is not None and _shapes(head) == _shapes(abstract.params["head"]):
        weights["params"]["head"] = head
    elif head is not None:
        have, want = _shapes(head), _shapes(abstract.params["head"])
        print(f"{path}: its projection head {have} does not fit this run's {want}: the head starts from scratch")
    return weights


# --- CLI: a published file -> a student directory (models.student.save_student's format).

ARCHS = {
    "mn10": dict(arch="mobilenet", width=1.0),
    "dymn10": dict(arch="dymn", width=1.0),
    "eres2net": dict(arch="eres2net"),
}
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_RECIPE = os.path.join(_REPO, "configs", "ssondo.py")


def student_config_for(arch: str, config_path: str = _RECIPE):
    """``configs/ssondo.py``'s {'student', 'audio'} sections with the student set to ``arch`` (mn10, dymn10,
    eres2net)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch={arch!r}: use one of {', '.join(ARCHS)}")
    if not os.path.isfile(config_path):
        raise ValueError(f"config file {config_path} not found: pass --config=PATH/TO/configs/ssondo.py")
    c = load_config_file(config_path, os.path.basename(config_path), None)
    student = c.student.to_dict() | ARCHS[arch] | {"init_from": ""}
    return mlc.ConfigDict({"student": student, "audio": c.audio.to_dict()})


def convert_to_student(path: str, arch: str, output: str, config_path: str = _RECIPE) -> dict:
    """Write ``output`` as ``save_student`` does (a model directory: ``weights.npz`` with the backbone's params and
    BatchNorm statistics, ``model.json`` with kind 'student' and the recipe's student and front-end sections, the
    front-end the checkpoint's own when it records one) and load it back with ``Student.load``."""
    check_output(output, directory=True)
    refuse_other_kind(output, "student")
    config = student_config_for(arch, config_path)
    variables, parts = _load(path, config.student)
    audio = frontend_of(parts["training_config"])
    if audio is not None:
        config.audio.update(audio)
    backbone = {collection: {"backbone": variables[collection]["backbone"]} for collection in ("params", "batch_stats")}
    state = SimpleNamespace(step=0, **backbone)
    save_student(output, config, state)
    student = Student.load(output)  # the directory reads back as a student
    params = count_params(student.variables["params"])
    return {"directory": output, "arch": arch, "params": params, "dropped": parts["dropped"], "layout": parts["layout"]}


def main(argv: list[str] | None = None) -> int:
    """The CLI; an unreadable file, a key mismatch or an unwritable output prints one ``error:`` line, returns 2."""
    ap = argparse.ArgumentParser(prog="python -m matpac_jax.distill.published", description=__doc__.split("\n")[0])
    ap.add_argument("--input", required=True, help="EfficientAT .pt or S-SONDO .ckpt (.safetensors also read)")
    ap.add_argument("--arch", required=True, choices=sorted(ARCHS), help="the student the file holds")
    ap.add_argument("--output", required=True, help="student model directory to write (model.json, weights.npz)")
    ap.add_argument("--config", default=_RECIPE, help="config file whose student and audio sections are used")
    args = ap.parse_args(argv)
    try:
        out = convert_to_student(args.input, args.arch, args.output, args.config)
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dropped = f"; dropped {len(out['dropped'])} classifier keys" if out["dropped"] else ""
    written = f"{out['arch']} backbone ({out['layout']} layout), {out['params']:,} parameters"
    print(f"wrote {out['directory']}: {written}{dropped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
