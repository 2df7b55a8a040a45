"""Where a compiled step's time goes: a ``jax.profiler`` trace reduced to a table a person can read.

``bench/profile_step.py`` captures a trace of a few steady-state steps (``create_perfetto_trace=True``) inside a
``TraceAnnotation`` named ``WINDOW``; ``summarize`` then reads the Chrome/Perfetto JSON with the standard library and
splits that window's wall time into categories:

* each device event that names an HLO instruction (``args['hlo_op']``: kernels on a GPU stream, XLA ops on a TPU
  core, thunks of XLA's CPU runtime when ``CPU_TRACE_FLAG`` is set) is mapped to the instruction in the compiled
  step's optimized HLO (``compiled.as_text()``) and categorised by what it computes (``categorize``);
* named scopes of the step (``SCOPES``: the log-mel front-end, the optimizer, the EMA move, the non-finite guard)
  take precedence, so that their kernels are counted as that job whatever XLA fused them into;
* memory copies on the device timeline without an HLO instruction are host <-> device transfers;
* the window is cut at every event boundary; each piece goes to the events running in it (equally, when several
  overlap: kernels on two streams, thunks on two CPU threads), or to ``IDLE`` when none runs. The categories
  therefore add up to the window exactly, and the window divided by the step count is the step time the trace saw.

Kernels of another program (e.g. a transfer's own small program) count as ``OTHER``; a kernel whose instruction is
not in the step's HLO is named in ``Summary.unknown_ops`` (a mismatch between the trace and the compiled text).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from collections import Counter, defaultdict

WINDOW = "profile_window"  # the TraceAnnotation around the profiled steps
CPU_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"  # XLA's CPU runtime then traces every thunk with its hlo_op

MATMUL = "matmul / convolution"
ATTENTION = "fused attention (cuDNN)"
ELEMENTWISE = "elementwise / reduction fusions"
GATHER = "gather / scatter"
COPY = "copy / transpose"
LOG_MEL = "log-mel front-end"
OPTIMIZER = "optimizer + EMA update"
GUARD = "non-finite guard"
TRANSFER = "host <-> device transfer"
OTHER = "other programs"
IDLE = "idle (no kernel running)"
CATEGORIES = (MATMUL, ATTENTION, ELEMENTWISE, GATHER, COPY, LOG_MEL, OPTIMIZER, GUARD, TRANSFER, OTHER, IDLE)

# jax.named_scope names used in the steps -> their category (matched as a whole word of an op's op_name metadata)
SCOPES = {"log_mel_frontend": LOG_MEL, "optimizer_update": OPTIMIZER, "ema_update": OPTIMIZER, "nonfinite_guard": GUARD}
_LAYOUT_OPS = {"parameter", "constant", "copy", "transpose", "bitcast", "reshape", "slice", "dynamic-slice"}
_LAYOUT_OPS |= {"concatenate", "pad", "broadcast", "tuple", "get-tuple-element", "copy-start", "copy-done"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?<![\w.\-\[])([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_GATHER_SOURCE = re.compile(r"take_along_axis|\b_take\b|/gather\b|/scatter[-_\w]*$")


@dataclasses.dataclass
class HloOp:
    opcode: str
    calls: list[str]
    op_name: str = ""
    target: str = ""  # custom_call_target
    text: str = ""  # the instruction's line (backend configs name Triton GEMM fusions)


def parse_hlo(text: str) -> tuple[str, dict[str, HloOp], dict[str, list[str]]]:
    """Optimized HLO text -> (module name, instruction name -> HloOp, computation name -> its instruction names)."""
    module = ""
    ops: dict[str, HloOp] = {}
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("HloModule "):
            module = line.split()[1].rstrip(",")
        elif line.rstrip().endswith("{") and not line.startswith(" "):
            name = line.split()[1] if line.startswith("ENTRY ") else line.split()[0]
            current = computations.setdefault(name.lstrip("%"), [])
        elif line.strip() == "}":
            current = None
        elif current is not None and (m := _INSTR.match(line)):
            name, rest = m.groups()
            opcode = _OPCODE.search(rest)
            op_name, target = _OP_NAME.search(rest), _TARGET.search(rest)
            ops[name] = HloOp(
                opcode.group(1) if opcode else "?",
                _CALLS.findall(rest),
                op_name.group(1) if op_name else "",
                target.group(1) if target else "",
                rest,
            )
            current.append(name)
    return module, ops, computations


def _scope_category(op_names: list[str]) -> str | None:
    for scope, category in SCOPES.items():
        if any(re.search(rf"(?<![\w]){scope}(?![\w])", n) for n in op_names):
            return category
    return None


def categorize(name: str, ops: dict[str, HloOp], computations: dict[str, list[str]]) -> str:
    """The category of HLO instruction ``name``: its named scope first, else what it (or its fused body) computes."""
    op = ops[name]
    inner: list[HloOp] = []
    todo, seen = list(op.calls), set()
    while todo:  # the fused / called computations, transitively
        c = todo.pop()
        if c in seen or c not in computations:
            continue
        seen.add(c)
        for i in computations[c]:
            inner.append(ops[i])
            todo.extend(ops[i].calls)
    everything = [op, *inner]
    scoped = _scope_category([o.op_name for o in everything if o.op_name])
    if scoped:
        return scoped
    targets = " ".join(o.target.lower() for o in everything)
    if "fmha" in targets or ("cudnn" in targets and "conv" not in targets):
        return ATTENTION
    opcodes = {o.opcode for o in (inner if op.opcode == "fusion" else everything)}
    if opcodes & {"dot", "convolution"} or any(k in targets for k in ("gemm", "matmul", "conv")):
        return MATMUL
    if "__triton_gemm" in op.text:
        return MATMUL
    if opcodes & {"gather", "scatter"} or any(_GATHER_SOURCE.search(o.op_name) for o in everything):
        return GATHER  # the gathers and scatters, and the zero-filled buffers their gradients scatter into
    if opcodes <= _LAYOUT_OPS:
        return COPY
    return ELEMENTWISE


def read_trace(directory: str) -> list[dict]:
    """The events of the newest ``perfetto_trace.json.gz`` (or ``*.trace.json.gz``) under ``directory``."""
    found = glob.glob(os.path.join(directory, "**", "perfetto_trace.json.gz"), recursive=True)
    found = found or glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {directory}: was the trace written?")
    with gzip.open(max(found, key=os.path.getmtime), "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


@dataclasses.dataclass
class Summary:
    steps: int
    window_s: float  # wall time of the profiled steps, as the trace saw it
    seconds: dict[str, float]  # category -> seconds over the window (sums to window_s)
    kernels: dict[str, tuple[str, float, int, str]]  # hlo_op (or event name) -> (category, seconds, calls, where)
    unknown_ops: set[str]
    device_events: int

    @property
    def step_s(self) -> float:
        return self.window_s / self.steps


def where(name: str, ops: dict[str, HloOp], computations: dict[str, list[str]]) -> str:
    """The source of an instruction, from its op_name (or its fused root's), short: 'jvp(Predictor)/trunk/blocks_0/
    attn/dot_general' rather than the whole name stack."""
    op = ops.get(name)
    if op is None:
        return ""
    names = [op.op_name] + [ops[i].op_name for c in op.calls for i in reversed(computations.get(c, []))]
    text = next((n for n in names if n), "")
    text = re.sub(r"^jit\([^)]*\)/", "", text)
    return text if len(text) <= 70 else "…" + text[-69:]


def _device_pids(events: list[dict]) -> tuple[set, dict]:
    names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    device = {p for p, n in names.items() if "/device:" in n}
    return device or set(names), names


def summarize(events: list[dict], hlo_text: str, steps: int) -> Summary:
    """Split the ``WINDOW`` annotation's wall time over ``CATEGORIES`` (see the module docstring)."""
    module, ops, computations = parse_hlo(hlo_text)
    windows = [e for e in events if e.get("ph") == "X" and e.get("name") == WINDOW]
    if not windows:
        raise ValueError(f"the trace has no {WINDOW!r} annotation around the profiled steps")
    w = max(windows, key=lambda e: e["dur"])
    t0, t1 = float(w["ts"]), float(w["ts"]) + float(w["dur"])
    device_pids, _ = _device_pids(events)
    intervals = []  # (start, end, key, category)
    cache: dict[str, str] = {}
    unknown: set[str] = set()
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in device_pids or "dur" not in e:
            continue
        args = e.get("args") or {}
        hlo_op, name = args.get("hlo_op"), e.get("name", "")
        if hlo_op:
            if args.get("hlo_module", module) != module:
                key, category = f"{args.get('hlo_module')}:{hlo_op}", OTHER
            elif hlo_op in ops:
                key = hlo_op
                category = cache.get(hlo_op) or cache.setdefault(hlo_op, categorize(hlo_op, ops, computations))
            else:
                key, category = hlo_op, OTHER
                unknown.add(hlo_op)
        elif re.search(r"(?i)memcpy|htod|h2d|dtoh|d2h", name):
            key, category = name, TRANSFER
        else:
            continue
        s, t = max(float(e["ts"]), t0), min(float(e["ts"]) + float(e["dur"]), t1)
        if t > s:
            intervals.append((s, t, key, category))
    seconds: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    per_key: dict[str, float] = defaultdict(float)
    # Sweep over the window: each piece between two boundaries goes to the events running in it, or to IDLE.
    bounds = sorted({t0, t1, *(x for iv in intervals for x in iv[:2])})
    starts = sorted(intervals, key=lambda iv: iv[0])
    active: list = []
    j = 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        while j < len(starts) and starts[j][0] <= a:
            active.append(starts[j])
            j += 1
        active = [iv for iv in active if iv[1] > a]
        if not active:
            seconds[IDLE] += (b - a) * 1e-6
            continue
        share = (b - a) * 1e-6 / len(active)
        for iv in active:
            seconds[iv[3]] += share
            per_key[iv[2]] += share
    calls = Counter(iv[2] for iv in intervals)
    category_of = {iv[2]: iv[3] for iv in intervals}
    kernels = {k: (category_of[k], v, calls[k], where(k, ops, computations)) for k, v in per_key.items()}
    return Summary(steps, (t1 - t0) * 1e-6, seconds, kernels, unknown, len(intervals))


def format_summary(s: Summary, top: int = 20) -> str:
    """Markdown: the categories (ms per step, share of the step) and the ``top`` costliest kernels."""
    lines = [
        f"step {s.step_s * 1e3:.3f} ms (trace window {s.window_s * 1e3:.2f} ms / {s.steps} steps, "
        f"{s.device_events} device events)",
        "",
        "| category | ms / step | share |",
        "|---|---|---|",
    ]
    for c in CATEGORIES:
        if s.seconds[c] > 0:
            lines.append(f"| {c} | {s.seconds[c] / s.steps * 1e3:.3f} | {s.seconds[c] / s.window_s:.1%} |")
    lines += ["", f"| top {top} kernels (HLO op) | category | ms / step | share | calls / step | source |"]
    lines.append("|---|---|---|---|---|---|")
    ranked = sorted(s.kernels.items(), key=lambda kv: -kv[1][1])[:top]
    for name, (category, sec, n, src) in ranked:
        ms, share = sec / s.steps * 1e3, sec / s.window_s
        lines.append(f"| {name} | {category} | {ms:.3f} | {share:.1%} | {n / s.steps:g} | {src} |")
    if s.unknown_ops:
        lines.append(f"\nkernels not found in the step's HLO (counted as {OTHER!r}): {sorted(s.unknown_ops)[:10]}")
    return "\n".join(lines)
