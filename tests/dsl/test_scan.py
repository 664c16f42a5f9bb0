"""The DSL's scans, causal convolution and state parameters: parsed, checked and evaluated
against torch formulas written here (torch.cumsum / cumprod, a step loop of the recurrence,
torch's grouped conv1d), in the program's precision and in float64; states read with their
old value throughout a call and written after it."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

import layerforge
from layerforge.dsl.evaluator import evaluate, evaluate_states
from layerforge.dsl.ir import Op

F64 = torch.float64


def program(text: str):
    return layerforge.loads(textwrap.dedent(text), "m.lf", with_stdlib=False)


CUMULATIVE = """\
    dims H
    dynamic N
    layer running(x: T[N, H]) -> (T[N, H], T[N, H]) {
        return cumsum(x, axis=0), cumprod(x, axis=-1)
    }
    layer counts(m: i32[N, H]) -> i32[N, H] {
        return cumsum(m, axis=-1)
    }
    """


def test_cumsum_and_cumprod_match_torch():
    layer = program(CUMULATIVE).specialise("running", H=5, dtype="f32")
    x = torch.rand(7, 5) + 0.5
    s, p = evaluate(layer.function, {"x": x})
    torch.testing.assert_close(s, torch.cumsum(x, 0))
    torch.testing.assert_close(p, torch.cumprod(x, -1))
    s64, p64 = evaluate(layer.function, {"x": x}, precision="float64")
    assert s64.dtype == F64
    torch.testing.assert_close(s64, torch.cumsum(x.double(), 0), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(p64, torch.cumprod(x.double(), -1), rtol=1e-15, atol=1e-15)


def test_cumsum_accumulates_halves_in_f32_and_keeps_integer_dtypes():
    prog = program(CUMULATIVE)
    x = torch.randn(64, 3).to(torch.bfloat16)
    (s, _) = evaluate(prog.specialise("running", H=3, dtype="bf16").function, {"x": x})
    assert s.dtype == torch.bfloat16
    torch.testing.assert_close(s, torch.cumsum(x.float(), 0).to(torch.bfloat16), rtol=0, atol=0)
    m = torch.randint(0, 3, (4, 6), dtype=torch.int32)
    (c,) = evaluate(prog.specialise("counts", H=6).function, {"m": m})
    assert c.dtype == torch.int32 and torch.equal(c, torch.cumsum(m, -1).int())


LINEAR = """\
    dims H
    dynamic N
    layer lin(a1: f32[H], b1: f32[H], a2: f32[H], b2: f32[H]) -> (f32[H], f32[H]) {
        return a1 * a2, a2 * b1 + b2
    }
    layer recur(a: f32[N, H], b: f32[N, H]) -> f32[N, H] {
        decay, h = scan(lin, a, b, axis=0)
        return h
    }
    layer recur_from(a: f32[N, H], b: f32[N, H], h0: f32[H]) -> f32[N, H] {
        decay, h = scan(lin, a, b, axis=0)
        return h + decay * h0
    }
    layer running_max(x: f32[N, H]) -> f32[N, H] {
        return scan(biggest, x, axis=0)
    }
    layer biggest(a: f32[H], b: f32[H]) -> f32[H] {
        return max(a, b)
    }
    """


def loop(a, b, h0=None):
    h = torch.zeros(a.shape[1], dtype=F64) if h0 is None else h0.double()
    out = []
    for t in range(a.shape[0]):
        h = a[t].double() * h + b[t].double()
        out.append(h)
    return torch.stack(out)


def test_scan_over_a_combine_is_the_recurrence():
    prog = program(LINEAR)
    a, b = torch.rand(11, 4), torch.randn(11, 4)
    (h,) = evaluate(prog.specialise("recur", H=4).function, {"a": a, "b": b}, precision="float64")
    torch.testing.assert_close(h, loop(a, b), rtol=1e-13, atol=1e-13)
    h0 = torch.randn(4)
    (h,) = evaluate(prog.specialise("recur_from", H=4).function, {"a": a, "b": b, "h0": h0}, precision="float64")
    torch.testing.assert_close(h, loop(a, b, h0), rtol=1e-13, atol=1e-13)
    (h32,) = evaluate(prog.specialise("recur", H=4).function, {"a": a, "b": b})
    assert h32.dtype == torch.float32
    torch.testing.assert_close(h32.double(), loop(a, b), rtol=1e-5, atol=1e-5)


def test_scan_with_one_operand_and_a_non_arithmetic_combine():
    x = torch.randn(9, 3)
    (m,) = evaluate(program(LINEAR).specialise("running_max", H=3).function, {"x": x})
    torch.testing.assert_close(m, torch.cummax(x, 0).values, rtol=0, atol=0)


def test_scan_ir_holds_the_combine_as_a_step_function():
    fn = program(LINEAR).specialise("recur", H=4).function
    (scan,) = [n for n in fn.nodes() if n.op is Op.SCAN]
    assert scan.arg.fn == "combine" and scan.arg.axis == 0 and scan.arg.which == 1
    step = scan.arg.combine
    assert [p.name for p in step.params] == ["carry0", "carry1", "elem0", "elem1"]
    assert all(tuple(p.shape) == (4,) for p in step.params) and len(step.outputs) == 2


CONV = """\
    dims C, K
    dynamic B, S
    layer conv(x: T[B, C, S], w: T[C, K]) -> (T[B, C, S], T[B, C, K - 1]) {
        y, s = conv1d_causal(x, w, axis=-1)
        return y, s
    }
    layer conv_time_major(x: T[S, C], w: T[C, K], state s: T[K - 1, C]) -> T[S, C] {
        y, s = conv1d_causal(x, w, axis=0, state=s)
        return y
    }
    """


@pytest.mark.parametrize("k", [2, 3, 4])
def test_conv1d_causal_is_grouped_conv1d(k):
    layer = program(CONV).specialise("conv", C=5, K=k, dtype="f32")
    x, w = torch.randn(2, 5, 9), torch.randn(5, k)
    y, s = evaluate(layer.function, {"x": x, "w": w}, precision="float64")
    want = F.conv1d(x.double(), w.double()[:, None], padding=k - 1, groups=5)[..., :9]
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(s, x.double()[..., 9 - (k - 1):], rtol=0, atol=0)


def test_state_is_read_then_written_after_the_call():
    layer = program(CONV).specialise("conv_time_major", C=3, K=4, dtype="f32")
    x, w = torch.randn(10, 3), torch.randn(3, 4)
    s = torch.zeros(3, 3)
    (whole,) = evaluate(layer.function, {"x": x, "w": w, "s": s.clone()})
    parts = [evaluate(layer.function, {"x": x[a:b].contiguous(), "w": w, "s": s})[0] for a, b in ((0, 4), (4, 5), (5, 10))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-6, atol=1e-6)   # prefill, a step, the rest
    torch.testing.assert_close(s, x[-3:], rtol=0, atol=0)                      # the state holds the last K - 1


def test_evaluate_states_returns_new_states_and_leaves_the_given_ones():
    layer = program(CONV).specialise("conv_time_major", C=3, K=3, dtype="f32")
    x, w, s = torch.randn(6, 3), torch.randn(3, 3), torch.randn(2, 3)
    before = s.clone()
    (y,), states = evaluate_states(layer.function, {"x": x, "w": w, "s": s}, precision="float64")
    assert torch.equal(s, before) and states["s"].dtype == F64
    torch.testing.assert_close(states["s"], x[-2:].double())
    xs = torch.cat([before, x]).double()
    want = sum(w[:, j].double() * xs[j:j + 6] for j in range(3))
    torch.testing.assert_close(y, want, rtol=1e-13, atol=1e-13)


def test_an_output_that_is_the_old_state_survives_the_update():
    prog = program("""\
        dynamic N
        layer swap(x: f32[N], state s: f32[N]) -> f32[N] {
            old = s
            s = x
            return old
        }
        """)
    x, s = torch.randn(4), torch.randn(4)
    before = s.clone()
    (out,) = evaluate(prog.specialise("swap").function, {"x": x, "s": s})
    assert torch.equal(out, before) and torch.equal(s, x)
