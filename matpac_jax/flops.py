"""Exact matmul FLOP counting by walking a function's jaxpr (the MFU of ``train.loop`` and ``bench/``).

``count_matmul_flops(fn, *args)`` traces ``fn`` with :func:`jax.make_jaxpr` (nothing is compiled or run, so
``jax.ShapeDtypeStruct`` placeholders work) and sums ``2 * MACs`` over every ``dot_general`` and
``conv_general_dilated`` equation. Only matmul-like work is counted: elementwise ops, reductions, softmax,
normalisation etc. contribute nothing; attention is counted through its ``dot_general`` equations (QK^T and PV).

The count is what the traced program executes, with what the project's steps contain (the MATPAC pretraining step
with its remat / layer-scan / gradient-accumulation / cuDNN-attention options, the S-SONDO step of every student):

* ``scan`` bodies (layer scan, gradient accumulation) are multiplied by ``length``;
* ``cond`` (``lax.cond``, ``lax.switch``) contributes the most expensive branch (an upper bound: only one runs);
* every other equation that holds jaxprs in its parameters -- ``jit``, ``remat``/``jax.checkpoint``,
  ``custom_jvp_call``/``custom_vjp_call`` (their only jaxpr is the primal; the jvp/fwd/bwd rules are thunks that
  ``jax.grad`` inlines into the outer jaxpr, where they are counted) -- contributes the sum of those jaxprs.
  Recomputation by ``remat`` under ``jax.grad`` is in the jaxpr, so it is counted;
* cuDNN's fused attention (``jax.nn.dot_product_attention(implementation='cudnn')``, ``model.attn_impl='cudnn'`` or
  ``'auto'`` on a GPU) is counted as the matmuls XLA's attention writes for the same shapes
  (:func:`fused_attention_flops`), so that steps with either attention count the same FLOPs and their MFUs compare;
* any other opaque primitive that may hide matmuls is not counted, with a warning.

Conventions:

* ``dot_general``: ``2 * prod(batch) * prod(lhs free) * prod(rhs free) * prod(contracting)``.
* ``conv_general_dilated``: ``2 * out_elements * prod(kernel spatial) * kernel_in_features``: every output element
  costs a full kernel window (padding included), except along lhs-dilated (transposed-conv) dims, where only taps
  that hit real input elements count -- see :func:`conv_general_dilated_flops`.
* Dtype does not matter (bf16 == f32).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr

__all__ = [
    "count_matmul_flops",
    "jaxpr_matmul_flops",
    "eqn_matmul_flops",
    "MATMUL_PRIMITIVES",
    "FUSED_ATTENTION_MATMULS",
    "fused_attention_flops",
    "dot_general_flops",
    "conv_general_dilated_flops",
    "as_jaxpr",
    "sub_jaxprs",
    "peak_flops",
]

MATMUL_PRIMITIVES = ("dot_general", "conv_general_dilated")
# jax's cuDNN fused attention primitives (jax._src.cudnn.fused_attention_stablehlo): name -> matmuls it stands for
# (2 forward: Q·Kᵀ and P·V; 4 backward: dQ, dK, dP, dV -- what the XLA path's jaxpr holds under jax.grad)
FUSED_ATTENTION_MATMULS = {
    "dot_product_attention_fwd_wrapper": 2,
    "dot_product_attention_fwd": 2,
    "dot_product_attention_bwd_wrapper": 4,
    "dot_product_attention_bwd": 4,
}
# Names hinting at matmul work hidden inside an opaque primitive (not counted -> warn once per walk).
_SUSPICIOUS = ("attention", "matmul", "pallas_call", "mosaic", "triton", "cublas", "cudnn", "gemm")


def _prod(xs: Iterable[int]) -> int:
    return int(math.prod(int(x) for x in xs))


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
    o = np.arange(out_size, dtype=np.int64) * stride - pad_lo
    q_max = (in_size - 1) * lhs_dil
    total = 0
    for k in range(kernel):
        q = o + k * rhs_dil
        total += int(np.count_nonzero((q >= 0) & (q <= q_max) & (q % lhs_dil == 0)))
    return total


def conv_general_dilated_flops(
    lhs_shape, rhs_shape, out_shape, dimension_numbers, window_strides, padding, lhs_dilation, rhs_dilation
) -> int:
    """``2 * out_elements * prod(kernel spatial) * kernel_in_features`` for a ``conv_general_dilated``.

    The arguments are the equation's operand / output shapes and parameters: ``dimension_numbers`` is its
    ``ConvDimensionNumbers(lhs_spec, rhs_spec, out_spec)`` with ``rhs_spec = (out_feature_dim, in_feature_dim,
    *spatial)``, ``padding`` its ``((lo, hi), ...)`` pairs. The kernel's in-feature size is already
    ``in_channels / feature_group_count``; with ``batch_group_count > 1`` (weight-gradient convs) each output element
    still reduces over exactly the kernel's in-features and window, so the same formula holds.

    Spatial dims with ``lhs_dilation > 1`` (transposed convs -- how JAX writes the input gradient of a strided conv)
    count only the taps that land on real input elements, not on the inserted zeros or the padding around them:
    backward-data kernels never multiply those zeros, and counting them would inflate the input gradient of a
    stride-s conv by ~s**2 (for a VALID conv with stride == kernel the count equals the forward's). Every other dim
    uses the full kernel window per output element, padding included.
    """
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    # out elements * kernel window = (non-spatial out dims) * prod over spatial dims of (out_d * kernel_d)
    macs = int(rhs_shape[rhs_spec[1]]) * int(out_shape[out_spec[0]]) * int(out_shape[out_spec[1]])
    for i in range(len(rhs_shape) - 2):
        out_d = int(out_shape[out_spec[2 + i]])
        ker_d = int(rhs_shape[rhs_spec[2 + i]])
        if int(lhs_dilation[i]) > 1:
            in_d = int(lhs_shape[lhs_spec[2 + i]])
            stride, pad_lo = int(window_strides[i]), int(padding[i][0])
            macs *= _valid_taps(out_d, ker_d, in_d, stride, pad_lo, int(lhs_dilation[i]), int(rhs_dilation[i]))
        else:
            macs *= out_d * ker_d
    return 2 * macs


def fused_attention_flops(name: str, q_shape, k_shape, v_shape, bnth: bool) -> int:
    """FLOPs of one fused-attention equation counted as XLA's attention on the same operands: Q·Kᵀ and P·V cost
    ``2·B·N·T·S·H`` each (T query, S key positions; H the head size of q / v), the backward's dQ and dK as Q·Kᵀ,
    dP and dV as P·V. The flash kernel's recomputation of Q·Kᵀ in its backward is not model work and not counted;
    a padded sequence (cuDNN wants multiples of 64, ``models.vit.attention``) counts at its padded length, as run."""
    if bnth:  # [B, N, T, H]
        (b, n, t, h_qk), s, h_v = q_shape, k_shape[2], v_shape[3]
    else:  # [B, T, N, H], jax.nn.dot_product_attention's layout
        (b, t, n, h_qk), s, h_v = q_shape, k_shape[1], v_shape[3]
    per_pair = 2 * b * n * t * s * (h_qk + h_v)  # one Q·Kᵀ and one P·V
    return per_pair * FUSED_ATTENTION_MATMULS[name] // 2


def eqn_matmul_flops(eqn: Any) -> int:
    """2 * MACs of one ``dot_general`` or ``conv_general_dilated`` equation (0 for any other primitive; the
    sub-jaxprs of an equation are not entered: :func:`jaxpr_matmul_flops` does that)."""
    shapes = [tuple(v.aval.shape) for v in (*eqn.invars[:2], eqn.outvars[0])]
    p = eqn.params
    if eqn.primitive.name in FUSED_ATTENTION_MATMULS:
        q, k, v = (tuple(x.aval.shape) for x in eqn.invars[:3])
        return fused_attention_flops(eqn.primitive.name, q, k, v, bnth=int(p.get("layout", 0)) == 1)
    if eqn.primitive.name == "dot_general":
        return dot_general_flops(shapes[0], shapes[1], p["dimension_numbers"])
    if eqn.primitive.name == "conv_general_dilated":
        return conv_general_dilated_flops(
            *shapes, p["dimension_numbers"], p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"]
        )
    return 0


def as_jaxpr(x: Any) -> Jaxpr | None:
    """The ``Jaxpr`` of ``x`` (a ``ClosedJaxpr``'s, or ``x`` itself), or None when ``x`` is neither."""
    if isinstance(x, ClosedJaxpr):
        return x.jaxpr
    if isinstance(x, Jaxpr):
        return x
    return None


def sub_jaxprs(value: Any) -> list[Jaxpr]:
    """The jaxprs held by one equation parameter: a ``Jaxpr``, a ``ClosedJaxpr``, or a tuple / list of them (the
    branches of a ``cond``); ``[]`` for any other value."""
    j = as_jaxpr(value)
    if j is not None:
        return [j]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in sub_jaxprs(v)]
    return []


class _Walker:
    """One count: jaxprs already counted (by id, kept alive so that ids stay unique) and warnings already given."""

    def __init__(self) -> None:
        self.memo: dict[int, int] = {}
        self.keep_alive: list[Jaxpr] = []
        self.warned: set[str] = set()

    def jaxpr(self, jaxpr: Jaxpr) -> int:
        key = id(jaxpr)
        if key not in self.memo:
            self.memo[key] = sum(self.eqn(e) for e in jaxpr.eqns)
            self.keep_alive.append(jaxpr)
        return self.memo[key]

    def eqn(self, eqn: Any) -> int:
        name, params = eqn.primitive.name, eqn.params
        if name in MATMUL_PRIMITIVES or name in FUSED_ATTENTION_MATMULS:
            return eqn_matmul_flops(eqn)
        if name == "scan":
            return int(params["length"]) * self.jaxpr(as_jaxpr(params["jaxpr"]))
        if name == "cond":  # lax.cond and lax.switch
            return max((self.jaxpr(j) for j in sub_jaxprs(params["branches"])), default=0)
        sub = sum(self.jaxpr(j) for v in params.values() for j in sub_jaxprs(v))
        if not sub and any(s in name for s in _SUSPICIOUS) and name not in self.warned:
            self.warned.add(name)
            warnings.warn(
                f"count_matmul_flops: primitive {name!r} may perform matmuls that are not counted", stacklevel=2
            )
        return sub


def jaxpr_matmul_flops(jaxpr: ClosedJaxpr | Jaxpr) -> int:
    """Matmul FLOPs (2*MACs of every dot_general / conv_general_dilated) of a ``Jaxpr`` or ``ClosedJaxpr``.

    Recurses into sub-jaxprs; see the module docstring for the conventions. The count is what the jaxpr contains,
    including any rematerialisation.
    """
    j = as_jaxpr(jaxpr)
    if j is None:
        raise TypeError(f"jaxpr_matmul_flops: expected a Jaxpr or ClosedJaxpr, got {type(jaxpr).__name__}")
    return _Walker().jaxpr(j)


def count_matmul_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Matmul FLOPs of ``fn(*args, **kwargs)``: ``jax.make_jaxpr`` traces it (nothing is compiled or run; arrays and
    ``jax.ShapeDtypeStruct`` leaves are abstract alike) and :func:`jaxpr_matmul_flops` counts the jaxpr."""
    return jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs))


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
