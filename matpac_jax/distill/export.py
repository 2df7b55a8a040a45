r"""Edge export of S-SONDO students: ONNX graphs written by jax2onnx, checked and timed with onnxruntime (CPU).

The exported graph is the whole inference path, front-end included:

    input  "wave"       float32 [B, S]   audio in [-1, 1] at the front-end's rate (32 kHz for the students)
    -> log-mel          ``audio.frontend.log_mel`` as is: framing by reshape / slice / concat, Hann window, ONNX
                        ``DFT`` (what jax2onnx makes of ``jnp.fft.rfft``), power, mel filterbank, log, normalisation
    -> student          any Flax module ``(mel [B, F, T], train) -> [B, D]`` in inference mode (BatchNorm running
                        statistics); parameters are closed over and become the graph's initialisers
    output "embedding"  float32 [B, D]

Shapes are fixed at export (``B`` and ``S`` of the example input): jax2onnx cannot lower the no-op ``pad`` that
``jnp.fft.rfft(..., n=n_fft)`` traces with a symbolic batch, so export once per deployment shape (a 10-s clip at
32 kHz, batch 1: ``[1, 320000]``). The ``DFT`` in the graph needs opset 20 or later. With ``cfg=None`` in
:func:`student_fn` the graph starts at the log-mel instead (``mel [B, F, T]``, the front-end left to the host, for
runtimes without ``DFT``); that graph can keep a symbolic batch (example input ``("B", 128, 1000)``). onnxruntime's
CPU ``DFT`` is slow: about 37 ms of a 10-s clip's 73 ms with mn10 on one thread of a 2-core EPYC.

jax2onnx (0.13) leaves stale shape annotations on values its transpose folding rewrote (a Conv → BatchNorm →
activation chain keeps NCHW, the annotations say NHWC), which onnxruntime rejects at load; :func:`export_onnx` drops
every intermediate annotation and infers the shapes again with ``onnx.shape_inference``. Conversion traces the
function with stand-in primitives; :func:`export_onnx` clears JAX's in-memory caches afterwards so that no jitted
function reuses such a trace (jitted functions recompile on their next call).

Commands:

    pip install -e '.[export]'
    python -m matpac_jax.distill.export WORKDIR/student mn10.onnx     # a trained student (models.student.save_student)
    python bench/export.py --student mn10 --repeats 20                # report of a randomly initialised mn10

In Python::

    fn = student_fn(model, {"params": p, "batch_stats": bs}, cfg)    # wave [B, S] -> embedding [B, D]
    export_onnx(fn, [wave], "student.onnx")                          # -> {'path', 'size_bytes', 'inputs', ...}
    check_onnx("student.onnx", fn, [wave])                           # max |onnxruntime - JAX|, raises above atol
    latency_ms("student.onnx", [wave], repeats=20)                   # median onnxruntime CPU latency
    export_report(model, variables, "student.onnx", cfg=cfg)        # all of it for a 10-s clip, batch 1
    s = Student.load("WORKDIR/student")                              # a trained student (models.student)
    model, variables, cfg = s.backbone, s.variables, s.frontend
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from matpac_jax.audio.frontend import LogMelConfig, log_mel
from matpac_jax.models.student import Student
from matpac_jax.models.students import count_params

__all__ = [
    "CLIP_SAMPLES",
    "DEFAULT_OPSET",
    "STUDENT_FRONTEND",
    "check_onnx",
    "export_onnx",
    "export_report",
    "latency_ms",
    "student_fn",
]

# The recipe's student front-end (SPEC §6, configs/ssondo.py): 32 kHz, 1024-sample periodic Hann windows every 512
# samples, 128 Slaney mels from 50 Hz to 16 kHz, log(x + 1e-3), no normalisation. A trained student is exported with
# the front-end of its own config (Student.load): the CLI below.
STUDENT_FRONTEND = LogMelConfig(32000, 1024, 1024, 512, 128, 50.0, 16000.0, 1e-3, None, None, "float32")
CLIP_SAMPLES = 320_000  # a 10-s clip at 32 kHz
DEFAULT_OPSET = 20  # the first opset with the DFT signature jax2onnx emits


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"ONNX export needs {module} (jax2onnx, onnx and onnxruntime): pip install -e '.[export]'"
        ) from e


def _not_dm_pix_import(record: logging.LogRecord) -> bool:
    """Log filter: jax2onnx 0.13's dm_pix (image) plugins fail to import under jax 0.10, unused here."""
    args = record.args if isinstance(record.args, tuple) else ()
    return not (args and str(args[0]).startswith("jax2onnx.plugins.dm_pix."))


def _used_names(graph: Any) -> set[str]:
    """Names read by the nodes of an ONNX graph and its subgraphs, and its outputs."""
    names = {v.name for v in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in (attr.g, *attr.graphs):
                names |= _used_names(sub)
    return names


def _input_spec(x: Any) -> Any:
    """An array or ``jax.ShapeDtypeStruct`` -> its shape and dtype; a tuple of dims (str: symbolic) as is, float32."""
    if isinstance(x, tuple):
        return x
    x = x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def student_fn(
    model: nn.Module, variables: Mapping[str, Any], cfg: LogMelConfig | None = STUDENT_FRONTEND
) -> Callable[[jax.Array], jax.Array]:
    """Pure inference function of a student, variables closed over: wave [B, S] -> [B, D] (mel [B, F, T] -> [B, D]
    with ``cfg=None``)."""

    def fn(x: jax.Array) -> jax.Array:
        return model.apply(variables, x if cfg is None else log_mel(x, cfg), train=False)

    return fn


def export_onnx(
    fn: Callable[..., Any],
    example_inputs: Sequence[Any],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """Convert a pure JAX function to an ONNX file at ``path``, for the shapes and dtypes of ``example_inputs``
    (arrays, ``jax.ShapeDtypeStruct`` or float32 shape tuples with str dims for symbolic sizes, e.g. ``("B", 128, T)``).

    Returns ``{'path', 'size_bytes', 'inputs', 'outputs', 'opset', 'jax2onnx'}`` (inputs and outputs: name -> shape).
    """
    jax2onnx = _require("jax2onnx")
    onnx = _require("onnx")
    specs = [_input_spec(x) for x in example_inputs]
    logging.getLogger("jax2onnx.plugins.plugin_system").addFilter(_not_dm_pix_import)
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx 0.13's Flax conv plugin prints debug lines
        model = jax2onnx.to_onnx(
            fn, specs, model_name=name, opset=opset, input_names=input_names, output_names=output_names
        )
    jax.clear_caches()  # traces cached during the conversion hold jax2onnx's stand-in primitives: never reuse them
    del model.graph.value_info[:]  # stale after jax2onnx's transpose folding (module docstring)
    used = _used_names(model.graph)
    unused = [t for t in model.graph.initializer if t.name not in used]  # constants left by jax2onnx's rewrites
    for t in unused:
        model.graph.initializer.remove(t)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save(model, path)

    def shapes(values) -> dict[str, list[int | str]]:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    return {
        "path": path,
        "size_bytes": os.path.getsize(path),
        "inputs": shapes(model.graph.input),
        "outputs": shapes(model.graph.output),
        "opset": opset,
        "jax2onnx": importlib.metadata.version("jax2onnx"),
    }


def _session(path: str | os.PathLike, threads: int = 0) -> Any:
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def _feeds(session: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the graph takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    return {name: np.asarray(x) for name, x in zip(names, inputs, strict=True)}


def check_onnx(
    path: str | os.PathLike, reference_fn: Callable[..., Any], inputs: Sequence[Any], atol: float = 1e-4
) -> float:
    """Max |onnxruntime (CPU) - JAX| over all outputs of the graph at ``path`` against ``reference_fn(*inputs)``.

    Raises ``ValueError`` when the shapes differ or the difference exceeds ``atol`` (or is not finite).
    """
    session = _session(path)
    got = session.run(None, _feeds(session, inputs))
    reference = reference_fn if hasattr(reference_fn, "lower") else jax.jit(reference_fn)  # jitted already or not
    want = [np.asarray(w) for w in jax.tree.leaves(reference(*inputs))]
    if [g.shape for g in got] != [w.shape for w in want]:
        raise ValueError(f"{path}: output shapes {[g.shape for g in got]} != JAX {[w.shape for w in want]}")
    diff = max(float(np.max(np.abs(g.astype(np.float64) - w), initial=0.0)) for g, w in zip(got, want, strict=True))
    if not diff <= atol:
        raise ValueError(f"{path}: onnxruntime output differs from JAX by {diff:.3g} (max abs) > atol={atol:g}")
    return diff


def latency_ms(path: str | os.PathLike, inputs: Sequence[Any], repeats: int = 20, threads: int = 0) -> float:
    """Median wall time (ms) of one onnxruntime CPU run on ``inputs``, after two warm-up runs."""
    session = _session(path, threads)
    feeds = _feeds(session, inputs)
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def export_report(
    model: nn.Module,
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    cfg: LogMelConfig = STUDENT_FRONTEND,
    batch: int = 1,
    num_samples: int = CLIP_SAMPLES,
    repeats: int = 20,
    threads: int = 0,
    atol: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Export ``wave [batch, num_samples] -> embedding``, check it and time it on a random waveform.

    Returns ``{'params', 'size_bytes', 'max_abs_diff', 'max_abs_embedding', 'latency_ms', 'latency_ms_per_clip',
    'clip_seconds', 'batch', 'inputs', 'outputs', 'opset', 'path', 'jax2onnx', 'onnxruntime'}``; ``latency_ms`` is
    one run of the whole batch (``threads`` onnxruntime threads, 0: its default), ``latency_ms_per_clip`` divides it
    by ``batch``.
    """
    fn = jax.jit(student_fn(model, variables, cfg))
    wave = (0.1 * np.random.default_rng(seed).standard_normal((batch, num_samples))).astype(np.float32)
    info = export_onnx(fn, [wave], path, input_names=["wave"], output_names=["embedding"])
    diff = check_onnx(path, fn, [wave], atol)
    ms = latency_ms(path, [wave], repeats, threads)
    embedding = np.asarray(fn(wave))
    return {
        "params": count_params(variables["params"]),
        "size_bytes": info["size_bytes"],
        "max_abs_diff": diff,
        "max_abs_embedding": float(np.max(np.abs(embedding))),
        "latency_ms": ms,
        "latency_ms_per_clip": ms / batch,
        "clip_seconds": num_samples / cfg.sample_rate,
        "batch": batch,
        **{k: info[k] for k in ("inputs", "outputs", "opset", "path", "jax2onnx")},
        "onnxruntime": importlib.metadata.version("onnxruntime"),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: export a trained student model directory (``Student.load``) with its own front-end."""
    ap = argparse.ArgumentParser(description="Export a trained S-SONDO student (wave -> embedding) to ONNX.")
    ap.add_argument("student_dir", help="a student model directory (WORKDIR/student of a distillation run)")
    ap.add_argument("output", help="the .onnx file to write")
    ap.add_argument("--seconds", type=float, default=10.0, help="clip length fixed in the graph")
    ap.add_argument("--batch", type=int, default=1, help="batch size fixed in the graph")
    ap.add_argument("--repeats", type=int, default=20, help="onnxruntime runs timed")
    args = ap.parse_args(argv)
    student = Student.load(args.student_dir)
    model, variables, cfg = student.backbone, jax.device_get(student.variables), student.frontend
    samples = int(round(args.seconds * cfg.sample_rate))
    report = export_report(
        model, variables, args.output, cfg=cfg, batch=args.batch, num_samples=samples, repeats=args.repeats
    )
    for key, value in report.items():
        print(f"{key}: {value}")
    return report


if __name__ == "__main__":
    main()
