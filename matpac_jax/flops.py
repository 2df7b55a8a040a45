"""Exact matmul FLOP counting by walking a function's jaxpr.

``count_matmul_flops(fn, *args, **kwargs)`` traces ``fn`` with :func:`jax.make_jaxpr` (nothing is compiled or
executed, so ``jax.ShapeDtypeStruct`` placeholders work) and sums ``2 * MACs`` over every ``dot_general`` and
``conv_general_dilated`` equation, recursing into every sub-jaxpr (``jit``/``pjit``, ``closed_call``,
``remat``/``checkpoint``, ``scan``, ``cond``/``switch``, ``while``, ``shard_map``, ``custom_jvp_call``,
``custom_vjp_call``, ``custom_linear_solve``, ...).  Only matmul-like work is counted: elementwise ops,
reductions, softmax, normalisation etc. contribute nothing.  Attention is counted through its ``dot_general``
equations (QK^T and PV), which is how ``flax.linen`` and ``jax.nn.dot_product_attention`` (xla implementation)
express it.

The count is what the traced program executes:

* ``scan`` bodies are multiplied by ``length``.
* ``cond``/``switch`` contributes the most expensive branch (an upper bound; only one branch runs).
* ``while`` bodies are counted once and a warning is emitted, since the trip count is not static.
* ``remat``/``jax.checkpoint`` under ``jax.grad``: the backward pass recomputes (part of) the forward pass
  and that recomputation *is* counted, because the jaxpr contains it.  Count a non-remat version of the
  function if the conventional "model FLOPs" (forward + backward, no recomputation) are wanted.
* ``custom_jvp_call`` / ``custom_vjp_call``: only the primal ``call_jaxpr`` (``fun_jaxpr`` in older JAX) is
  counted; ``jvp_jaxpr_fun`` / ``fwd_jaxpr_thunk`` / ``bwd`` are thunks, not jaxprs.  Under ``jax.grad`` JAX
  inlines the custom rules (fwd and bwd) into the outer jaxpr, where they are counted as ordinary equations.
* ``custom_linear_solve``: only the ``solve`` jaxpr runs (``matvec``/``vecmat``/``transpose_solve`` are used
  for differentiation and transposition, which emit their own equations).
* ``shard_map`` bodies see per-shard shapes, so they are multiplied by the number of devices along the newly
  manual mesh axes: the result is the total over all devices, comparable with the unsharded program.
  ``xla_pmap`` bodies are multiplied by ``axis_size`` likewise.
* ``pallas_call`` kernels are counted as the kernel jaxpr's matmuls times the grid size (with a warning: only
  approximate).  Other opaque primitives whose names suggest matmul work (cuDNN attention, ...) are not
  counted and trigger a warning.

Conventions:

* ``dot_general``: ``2 * prod(batch) * prod(lhs free) * prod(rhs free) * prod(contracting)``.
* ``conv_general_dilated``: ``2 * out_elements * prod(kernel spatial) * kernel_in_features`` with
  ``kernel_in_features = in_channels / feature_group_count``: every output element costs a full kernel window
  (padding included), except along lhs-dilated (transposed-conv) dims, where only taps that hit real input
  elements count -- see :func:`conv_general_dilated_flops`.
* Dtype does not matter (bf16 == f32).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

try:  # public home of Jaxpr / ClosedJaxpr since jax 0.4.3x
    from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover - very old / very new JAX
    from jax.core import ClosedJaxpr, Jaxpr  # type: ignore[no-redef]

__all__ = ["count_matmul_flops", "jaxpr_matmul_flops", "dot_general_flops", "conv_general_dilated_flops"]

# Primitive names observed in jax 0.10.2 (older spellings kept for tolerance).
_SCAN = {"scan"}
_COND = {"cond", "switch"}
_WHILE = {"while"}
_CUSTOM_JVP = {"custom_jvp_call", "custom_jvp_call_jaxpr"}
_CUSTOM_VJP = {"custom_vjp_call", "custom_vjp_call_jaxpr"}
_LINEAR_SOLVE = {"custom_linear_solve"}
_SHARD_MAP = {"shard_map"}
_PMAP = {"xla_pmap"}
_PALLAS = {"pallas_call"}
# Names hinting at matmul work hidden inside an opaque primitive (not counted -> warn once per walk).
_SUSPICIOUS = ("attention", "matmul", "pallas_call", "mosaic", "triton", "cublas", "cudnn", "gemm")


def _prod(xs: Iterable[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def dot_general_flops(lhs_shape, rhs_shape, dimension_numbers) -> int:
    """``2 * batch * lhs_free * rhs_free * contracting`` for a ``dot_general``."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_shape, rhs_shape = tuple(lhs_shape), tuple(rhs_shape)
    batch = _prod(lhs_shape[d] for d in lhs_batch)
    contract = _prod(lhs_shape[d] for d in lhs_contract)
    lhs_used = set(lhs_contract) | set(lhs_batch)
    rhs_used = set(rhs_contract) | set(rhs_batch)
    lhs_free = _prod(s for d, s in enumerate(lhs_shape) if d not in lhs_used)
    rhs_free = _prod(s for d, s in enumerate(rhs_shape) if d not in rhs_used)
    return 2 * batch * lhs_free * rhs_free * contract


def _valid_taps(out_size, kernel, in_size, stride, pad_lo, lhs_dil, rhs_dil) -> int:
    """Number of (output position, kernel tap) pairs of one spatial dim that hit a real input element.

    In the padded, lhs-dilated input, output ``o`` and tap ``k`` read position ``o*stride + k*rhs_dil``, i.e.
    ``q = o*stride + k*rhs_dil - pad_lo`` in dilated-input coordinates; ``q`` is a real element iff
    ``0 <= q <= (in_size-1)*lhs_dil`` and ``q % lhs_dil == 0``.
    """
    if in_size <= 0 or out_size <= 0 or kernel <= 0:
        return 0
    o = np.arange(out_size, dtype=np.int64) * stride - pad_lo
    q_max = (in_size - 1) * lhs_dil
    total = 0
    for k in range(kernel):
        q = o + k * rhs_dil
        total += int(np.count_nonzero((q >= 0) & (q <= q_max) & (q % lhs_dil == 0)))
    return total


def conv_general_dilated_flops(
    rhs_shape,
    out_shape,
    dimension_numbers=None,
    *,
    lhs_shape=None,
    window_strides=None,
    padding=None,
    lhs_dilation=None,
    rhs_dilation=None,
) -> int:
    """``2 * out_elements * prod(kernel spatial) * kernel_in_features`` for a ``conv_general_dilated``.

    ``dimension_numbers`` is the primitive's ``ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)`` (or
    ``None`` for the default NC..., OI... layout); ``rhs_spec = (out_feature_dim, in_feature_dim, *spatial)``.
    The kernel's in-feature size is already ``in_channels / feature_group_count``; with
    ``batch_group_count > 1`` (weight-gradient convs) each output element still reduces over exactly the
    kernel's in-features and window, so the same formula holds.

    Spatial dims with ``lhs_dilation > 1`` (transposed convs -- how JAX writes the input gradient of a strided
    conv) count only the taps that land on real input elements, not on the inserted zeros or the padding
    around them: backward-data kernels never multiply those zeros, and counting them would inflate the input
    gradient of a stride-s conv by ~s**2 (for a VALID conv with stride == kernel the count equals the
    forward's).  Every other dim uses the full kernel window per output element, padding included.  The
    per-dim refinement needs ``lhs_shape``, ``window_strides`` and ``padding``; without them the plain formula
    is used.
    """
    rhs_shape, out_shape = tuple(rhs_shape), tuple(out_shape)
    nd = len(rhs_shape)
    if dimension_numbers is None:
        lhs_spec = rhs_spec = out_spec = tuple(range(nd))
    else:
        lhs_spec, rhs_spec, out_spec = (tuple(s) for s in dimension_numbers)
    in_features = int(rhs_shape[rhs_spec[1]])
    n_sp = nd - 2
    lhs_dilation = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * n_sp
    rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * n_sp
    window_strides = tuple(window_strides) if window_strides is not None else (1,) * n_sp
    refine = lhs_shape is not None and padding is not None and not isinstance(padding, str)

    # out elements * kernel window = (non-spatial out dims) * prod over spatial dims of (out_d * kernel_d)
    macs = in_features * int(out_shape[out_spec[0]]) * int(out_shape[out_spec[1]])
    for i in range(n_sp):
        out_d = int(out_shape[out_spec[2 + i]])
        ker_d = int(rhs_shape[rhs_spec[2 + i]])
        if refine and int(lhs_dilation[i]) > 1:
            macs *= _valid_taps(
                out_d,
                ker_d,
                int(tuple(lhs_shape)[lhs_spec[2 + i]]),
                int(window_strides[i]),
                int(padding[i][0]),
                int(lhs_dilation[i]),
                int(rhs_dilation[i]),
            )
        else:
            macs *= out_d * ker_d
    return 2 * macs


def _as_jaxpr(x: Any) -> Jaxpr | None:
    if isinstance(x, ClosedJaxpr):
        return x.jaxpr
    if isinstance(x, Jaxpr):
        return x
    return None


def _sub_jaxprs(value: Any) -> list[Jaxpr]:
    """Jaxprs contained in one equation param (a Jaxpr, a ClosedJaxpr, or a (named) tuple/list of them)."""
    j = _as_jaxpr(value)
    if j is not None:
        return [j]
    if isinstance(value, (tuple, list)):
        out: list[Jaxpr] = []
        for v in value:
            out.extend(_sub_jaxprs(v))
        return out
    return []


def _mesh_size(mesh: Any, axes: Iterable[str]) -> int:
    shape = dict(mesh.shape)
    return _prod(shape[a] for a in axes)


def _shard_map_multiplier(params: dict) -> int:
    mesh = params.get("mesh")
    if mesh is None:
        return 1
    try:
        if "newly_manual_axes" in params:  # jax 0.10
            axes = params["newly_manual_axes"]
        elif "manual_axes" in params:
            axes = params["manual_axes"]
        elif "auto" in params:  # older jax: the complement of the auto axes is manual
            axes = [a for a in mesh.axis_names if a not in params["auto"]]
        else:
            axes = mesh.axis_names
        return _mesh_size(mesh, axes)
    except Exception:  # unknown mesh flavour: be conservative
        warnings.warn("count_matmul_flops: could not read shard_map mesh size; counting one shard", stacklevel=3)
        return 1


class _Walker:
    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self.keep_alive: list[Any] = []
        self.warned: set[str] = set()

    def warn_once(self, key: str, msg: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(msg, stacklevel=4)

    def jaxpr(self, jaxpr: Jaxpr) -> int:
        key = id(jaxpr)
        if key in self.memo:
            return self.memo[key]
        total = sum(self.eqn(e) for e in jaxpr.eqns)
        self.memo[key] = total
        self.keep_alive.append(jaxpr)  # ids must stay unique while memoised
        return total

    def sum_params(self, values: Iterable[Any]) -> int:
        return sum(self.jaxpr(j) for v in values for j in _sub_jaxprs(v))

    def eqn(self, eqn: Any) -> int:
        name = eqn.primitive.name
        params = eqn.params

        if name == "dot_general":
            return dot_general_flops(_shape(eqn.invars[0]), _shape(eqn.invars[1]), params["dimension_numbers"])
        if name == "conv_general_dilated":
            return conv_general_dilated_flops(
                _shape(eqn.invars[1]),
                _shape(eqn.outvars[0]),
                params.get("dimension_numbers"),
                lhs_shape=_shape(eqn.invars[0]),
                window_strides=params.get("window_strides"),
                padding=params.get("padding"),
                lhs_dilation=params.get("lhs_dilation"),
                rhs_dilation=params.get("rhs_dilation"),
            )
        if name in _SCAN:
            return int(params["length"]) * self.sum_params([params["jaxpr"]])
        if name in _COND:
            return max((self.jaxpr(j) for j in _sub_jaxprs(params["branches"])), default=0)
        if name in _WHILE:
            body = self.sum_params([params.get("body_jaxpr")]) + self.sum_params([params.get("cond_jaxpr")])
            if body:
                self.warn_once(
                    f"while:{id(eqn)}",
                    "count_matmul_flops: while_loop trip count is unknown; its body's matmuls are counted "
                    "once (use lax.scan / fori_loop with static bounds for an exact count)",
                )
            return body
        if name in _CUSTOM_JVP or name in _CUSTOM_VJP:
            primal = params.get("call_jaxpr", params.get("fun_jaxpr"))
            if primal is not None:
                return self.sum_params([primal])
            # Unknown layout: fall back to params that are jaxprs (thunks are never jaxprs).
            return self.sum_params(params.values())
        if name in _LINEAR_SOLVE:
            jaxprs = params.get("jaxprs")
            solve = getattr(jaxprs, "solve", None)
            if solve is not None:
                return self.sum_params([solve])
            return self.sum_params(params.values())
        if name in _SHARD_MAP:
            return _shard_map_multiplier(params) * self.sum_params(params.values())
        if name in _PMAP:
            return int(params.get("axis_size", 1)) * self.sum_params(params.values())
        if name in _PALLAS:
            # The kernel jaxpr works on one block; it runs once per grid point.
            grid = getattr(params.get("grid_mapping"), "grid", None) or ()
            try:
                mult = _prod(grid)
            except (TypeError, ValueError):  # dynamic grid
                mult = 1
            self.warn_once(
                f"prim:{name}",
                f"count_matmul_flops: {name!r} counted as kernel matmuls x grid size {mult} (approximate: "
                "in-kernel loops and masking are not modelled)",
            )
            return mult * self.sum_params([params.get("jaxpr")])

        # Generic: jit/pjit ('jaxpr'), closed_call/core_call ('call_jaxpr'), remat2/checkpoint ('jaxpr'),
        # custom_transpose, and anything newer that carries sub-jaxprs in its params.
        sub = self.sum_params(params.values())
        if not sub and any(s in name for s in _SUSPICIOUS):
            self.warn_once(
                f"prim:{name}",
                f"count_matmul_flops: primitive {name!r} may perform matmuls that are not counted",
            )
        return sub


def _dce(jaxpr: Jaxpr) -> Jaxpr:
    try:  # private API (stable for years); only used on request
        from jax._src.interpreters import partial_eval as pe

        return pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars), instantiate=True)[0]
    except Exception as e:  # pragma: no cover - depends on JAX internals
        warnings.warn(f"jaxpr_matmul_flops: dead-code elimination unavailable ({e}); counting as is", stacklevel=3)
        return jaxpr


def jaxpr_matmul_flops(jaxpr: ClosedJaxpr | Jaxpr, *, dce: bool = False) -> int:
    """Matmul FLOPs (2*MACs of every dot_general / conv_general_dilated) of a ``Jaxpr`` or ``ClosedJaxpr``.

    Recurses into sub-jaxprs; see the module docstring for the control-flow conventions.  The count is what
    the jaxpr contains, including any rematerialisation.  A jaxpr traced from ``jax.grad`` may also contain
    primal work whose results are unused (e.g. the output of the last layer when only ``d loss / d x`` of a
    linear loss is needed); XLA removes it at compile time.  ``dce=True`` runs JAX's dead-code elimination
    (recursively, through jit/scan/cond/remat) before counting, to match that.
    """
    j = _as_jaxpr(jaxpr)
    if j is None:
        raise TypeError(f"expected a Jaxpr or ClosedJaxpr, got {type(jaxpr).__name__}")
    if dce:
        j = _dce(j)
    return _Walker().jaxpr(j)


def _is_array_like(x: Any) -> bool:
    if isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct)):
        return True
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)


def count_matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Trace ``fn(*args, **kwargs)`` with ``jax.make_jaxpr`` and return its matmul FLOPs.

    Returns ``2 * MACs`` summed over every ``dot_general`` and ``conv_general_dilated`` in the traced program,
    recursing into sub-jaxprs (``scan`` bodies times ``length``, max over ``cond`` branches, ``while`` bodies
    once with a warning, custom_jvp/custom_vjp primal only).  Nothing is compiled or run.

    Array-like leaves of ``args``/``kwargs`` (``jax.Array``, ``np.ndarray``, ``jax.ShapeDtypeStruct``) are
    traced abstractly; every other leaf (Python scalars, bools, strings, modules, ...) is passed through
    unchanged as a static value, so flags such as ``train=True`` work.

    The count is what the program executes: recomputation introduced by ``jax.checkpoint``/``remat`` under
    ``jax.grad`` is included.  Count the function without remat to obtain conventional model FLOPs.
    """
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    dyn_idx = [i for i, leaf in enumerate(leaves) if _is_array_like(leaf)]

    def flat_fn(*dyn: Any) -> Any:
        full = list(leaves)
        for i, d in zip(dyn_idx, dyn, strict=True):
            full[i] = d
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **k)

    dyn_args = [
        leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype)
        for leaf in (leaves[i] for i in dyn_idx)
    ]
    closed = jax.make_jaxpr(flat_fn)(*dyn_args)
    return jaxpr_matmul_flops(closed)


# Dense bf16 peak FLOP/s per chip (datasheets), for MFU.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(devices=None) -> float | None:
    """Summed dense bf16 peak FLOP/s of ``devices`` (default: all), or None for a device kind not in PEAK_FLOPS."""
    devices = jax.devices() if devices is None else devices
    kind = devices[0].device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind:
            return peak * len(devices)
    return None
