"""The step profile (bench/profile_step.py, matpac_jax.profile_summary): categories that add up to the step's time."""

import json
import os
import subprocess
import sys

import pytest

from matpac_jax import profile_summary as ps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written optimized HLO module: one of each kind of instruction the categories distinguish.
HLO = """HloModule jit_step, is_scheduled=true

%fused_dot (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, metadata={op_name="jit(step)/dot_general"}
}

%fused_adam (p0.1: f32[4,4]) -> f32[4,4] {
  %p0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %mul.2 = f32[4,4]{1,0} multiply(%p0.1, %p0.1), metadata={op_name="jit(step)/optimizer_update/mul"}
}

%fused_layout (p0.2: f32[4,4]) -> f32[4,4] {
  %p0.2 = f32[4,4]{1,0} parameter(0)
  ROOT %transpose.3 = f32[4,4]{0,1} transpose(%p0.2), dimensions={1,0}
}

ENTRY %main (a: f32[4,4], b: f32[4,4], i: s32[4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %i = s32[4]{0} parameter(2)
  %mel = f32[4,4]{1,0} fft(%a), fft_type=RFFT, metadata={op_name="jit(step)/log_mel_frontend/fft"}
  %matmul_fusion = f32[4,4]{1,0} fusion(%mel, %b), kind=kOutput, calls=%fused_dot
  %attn = (bf16[4,4], u8[0]) custom-call(%matmul_fusion), custom_call_target="__cudnn$fmhaSoftmax"
  %g = f32[4,4]{1,0} gather(%a, %i), offset_dims={1}, metadata={op_name="jit(step)/jit(_take)/gather"}
  %adam_fusion = f32[4,4]{1,0} fusion(%g), kind=kLoop, calls=%fused_adam
  %layout_fusion = f32[4,4]{0,1} fusion(%adam_fusion), kind=kLoop, calls=%fused_layout
  ROOT %tanh.9 = f32[4,4]{1,0} tanh(%layout_fusion), metadata={op_name="jit(step)/tanh"}
}
"""


def test_each_hlo_instruction_gets_the_category_of_what_it_computes():
    module, ops, comps = ps.parse_hlo(HLO)
    assert module == "jit_step"
    expected = {
        "mel": ps.LOG_MEL,  # a named scope wins over the opcode
        "matmul_fusion": ps.MATMUL,  # a fusion whose body holds a dot
        "attn": ps.ATTENTION,
        "g": ps.GATHER,
        "adam_fusion": ps.OPTIMIZER,  # the scope of an op inside the fused body
        "layout_fusion": ps.COPY,  # a fused body of layout ops only
        "tanh.9": ps.ELEMENTWISE,
    }
    assert {name: ps.categorize(name, ops, comps) for name in expected} == expected


def _event(name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid, "args": args}


def test_the_window_splits_into_categories_that_add_up_to_it():
    """Hand-computed: a 100 µs window over 2 steps; a matmul on one stream overlaps an optimizer kernel on another
    for 10 µs (each gets half of the overlap); a host-to-device copy; a kernel outside the window is clipped; a
    kernel of another program; the rest idle."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/host:CPU"}},
    ]
    events = meta + [
        _event(ps.WINDOW, 1000, 100, pid=9),
        _event("gemm_kernel", 1000, 30, hlo_op="matmul_fusion", hlo_module="jit_step"),
        _event("loop_fusion", 1020, 20, tid=2, hlo_op="adam_fusion", hlo_module="jit_step"),
        _event("MemcpyH2D", 1050, 5, tid=3),
        _event("tanh", 1090, 20, hlo_op="tanh.9", hlo_module="jit_step"),  # half outside the window
        _event("rng", 1060, 4, hlo_op="rng.1", hlo_module="jit_other"),
        _event("host_only", 1000, 100, pid=9, hlo_op="tanh.9", hlo_module="jit_step"),  # not a device event
    ]
    s = ps.summarize(events, HLO, steps=2)
    us = {k: round(v * 1e6, 6) for k, v in s.seconds.items() if v}
    assert us == {ps.MATMUL: 25, ps.OPTIMIZER: 15, ps.TRANSFER: 5, ps.ELEMENTWISE: 10, ps.OTHER: 4, ps.IDLE: 41}
    assert sum(s.seconds.values()) == pytest.approx(s.window_s, rel=1e-12)
    assert s.step_s == pytest.approx(50e-6)
    assert s.kernels["matmul_fusion"] == (ps.MATMUL, pytest.approx(25e-6), 1, "dot_general")
    assert s.unknown_ops == set()
    table = ps.format_summary(s)
    assert "| 25.0% |" in table.split(ps.MATMUL)[1].splitlines()[0]
    assert "| 41.0% |" in table.split(ps.IDLE)[1].splitlines()[0]


def test_a_trace_without_the_window_is_refused_naming_it():
    with pytest.raises(ValueError, match=ps.WINDOW):
        ps.summarize([_event("x", 0, 1)], HLO, steps=1)


def test_profile_of_the_smoke_step_on_cpu(tmp_path):
    """The real thing: the trainer's smoke pretraining step traced on one CPU device. Every traced kernel is an
    instruction of the step's HLO, the categories add up to the traced step time, and that agrees with the host
    clock over the same steps within 10 % (both bracket the same loop; the profiler's own work is in both)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as on a laptop
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(ROOT, ".jax_cache")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "profile_step.py"), "--config=configs/pp.py:smoke",
           "--steps=3", "--warmup=1", f"--out={tmp_path}", f"--trace-dir={tmp_path / 'trace'}"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fig = json.loads((tmp_path / "profile.json").read_text())
    ms = fig["ms_per_step"]
    assert fig["unknown_ops"] == [] and fig["device_events"] > 100
    assert sum(ms.values()) == pytest.approx(fig["traced_step_s"] * 1e3, rel=1e-6)
    assert fig["traced_step_s"] == pytest.approx(fig["host_step_s"], rel=0.10)
    for category in (ps.MATMUL, ps.ELEMENTWISE, ps.LOG_MEL, ps.OPTIMIZER, ps.GUARD):
        assert ms[category] > 0, category
    assert "| top 20 kernels" in (tmp_path / "profile.md").read_text()
