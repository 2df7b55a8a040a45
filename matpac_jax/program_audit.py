"""Audit a traced program for the costs that mixed precision and masking can hide (bench/step_audit.py prints it).

Every equation of a jaxpr, inside jit, grad, remat and scan bodies (times their length), is sorted into:

* matmul FLOPs by operand dtypes: the share that runs in 16-bit is what the tensor cores see;
* float32 upcasts (``convert_element_type`` from a 16-bit float) of at least ``min_elements`` elements, by source
  line: an activation-sized float32 tensor unless XLA fuses it into its consumer. Upcasts whose leading axes hold
  the batch are activations; the others are weight-sized (the float32 gradient of a 16-bit use of a float32
  parameter) and only totalled;
* gathers and scatters (the masked-token bookkeeping), by source line and shape, with the elements they move.
"""

from __future__ import annotations

import collections
import os
import re

import jax.numpy as jnp
import numpy as np
from jax.extend import source_info_util

from matpac_jax.flops import MATMUL_PRIMITIVES, as_jaxpr, eqn_matmul_flops, sub_jaxprs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOW = (jnp.bfloat16, jnp.float16)
_MOVES = ("gather", "scatter", "scatter-add", "scatter_add", "dynamic_slice", "dynamic_update_slice")
_SUMMARY = re.compile(r"(?P<file>.*?):(?P<line>\d+)(?::\d+)? \((?P<function>.*)\)", re.S)  # path:line[:column] (fn)


def where(eqn) -> str:
    """'path:line (function)' of the user code that emitted the equation, relative to the repository."""
    found = _SUMMARY.fullmatch(source_info_util.summarize(eqn.source_info))
    if found is None:  # no frame outside jax
        return "(no source)"
    return f"{found['file'].replace(_ROOT + os.sep, '')}:{found['line']} ({found['function']})"


def size(aval) -> int:
    return int(np.prod(aval.shape)) if hasattr(aval, "shape") else 0


def audit(jaxpr, batch: int, min_elements: int) -> dict:
    """Counters over the whole program (a Jaxpr or ClosedJaxpr): {'flops': operand dtypes -> FLOPs, 'slow_flops':
    source -> FLOPs not in 16-bit, 'upcasts': (source, shape) -> activation elements, 'weight_upcasts': elements,
    'moves': (primitive, source, shape) -> elements}."""
    flops = collections.Counter()  # operand dtypes -> matmul FLOPs
    slow_flops = collections.Counter()  # source -> matmul FLOPs not in 16-bit
    upcasts = collections.Counter()  # (source, shape) -> float32 activation elements produced
    weight_upcasts = collections.Counter()  # float32 weight-gradient elements
    moves = collections.Counter()  # (primitive, source, shape) -> elements moved

    def walk(j, mult: int) -> None:
        for eqn in j.eqns:
            name = eqn.primitive.name
            ins, outs = [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars]
            if name in MATMUL_PRIMITIVES:
                f = mult * eqn_matmul_flops(eqn)
                flops[f"{ins[0].dtype} x {ins[1].dtype}"] += f
                if ins[0].dtype not in _LOW or ins[1].dtype not in _LOW:
                    slow_flops[where(eqn)] += f
            elif name == "convert_element_type":
                if ins[0].dtype in _LOW and outs[0].dtype == jnp.float32 and size(outs[0]) >= min_elements:
                    if outs[0].shape[:1] == (batch,) or batch in outs[0].shape[1:2]:
                        upcasts[(where(eqn), outs[0].shape)] += mult * size(outs[0])
                    else:
                        weight_upcasts["all"] += mult * size(outs[0])
            elif name in _MOVES:
                moves[(name, where(eqn), outs[0].shape)] += mult * size(outs[0])
            inner = mult * int(eqn.params.get("length", 1)) if name == "scan" else mult
            for value in eqn.params.values():
                for sub in sub_jaxprs(value):
                    walk(sub, inner)

    walk(as_jaxpr(jaxpr), 1)
    return {
        "flops": flops,
        "slow_flops": slow_flops,
        "upcasts": upcasts,
        "weight_upcasts": weight_upcasts["all"],
        "moves": moves,
    }
