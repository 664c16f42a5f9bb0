"""Misused scans, causal convolutions and state parameters: each one `file:line:col: error:
message` with the source line and a caret (tests/dsl/test_errors.py's `expect`)."""
from __future__ import annotations

from .test_errors import expect, load_error, specialise_error, src

HEAD = """\
dims H, K
dynamic N
"""
LIN = """\
layer lin(a1: f32[H], b1: f32[H], a2: f32[H], b2: f32[H]) -> (f32[H], f32[H]) {
    return a1 * a2, a2 * b1 + b2
}
"""


def test_state_must_be_a_tensor():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], state s: f32) -> f32[N, H] {
            return x
        }
        """))
    expect(err, 3, 23, "state 's' must be a tensor")


def test_state_never_reassigned():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], state s: f32[H]) -> f32[N, H] {
            return x + s
        }
        """))
    expect(err, 3, 23, "state 's' is never reassigned", hint="plain tensor parameter")


def test_state_keeps_its_type():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], state s: f32[H]) -> f32[N, H] {
            s = x + s
            return x
        }
        """))
    expect(err, 4, 5, "state 's' is f32[H]; the new value is f32[N, H]")


def test_state_keeps_its_dtype():
    err = load_error(HEAD + src("""\
        layer f(x: bf16[N, H], state s: f32[N, H]) -> bf16[N, H] {
            s = x
            return x
        }
        """))
    expect(err, 4, 5, "state 's' is f32[N, H]; the new value is bf16[N, H]", hint="cast it, f32(...)")


def test_state_has_no_default():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], state s: f32[H] = 0.0) -> f32[N, H] {
            s = s * 2.0
            return x
        }
        """))
    expect(err, 3, 41, "a state cannot have defaults")


def test_a_layer_with_state_is_not_inlined():
    err = load_error(HEAD + src("""\
        layer acc(x: f32[H], state s: f32[H]) -> f32[H] {
            s = s + x
            return s
        }
        layer g(x: f32[H]) -> f32[H] {
            return acc(x, x)
        }
        """))
    expect(err, 8, 12, "'acc' carries state (s)")


def test_attention_blocks_carry_no_state():
    err = load_error(src("""\
        dims Hq, D
        dynamic S
        attention a(q: T[S, Hq, D], k: T[S, Hq, D], v: T[S, Hq, D], state c: f32[Hq]) -> T[S, Hq, D] {
        }
        """))
    expect(err, 3, 61, "attention blocks cannot carry state")


def test_scan_needs_a_layer_to_combine():
    err = load_error(HEAD + src("""\
        layer f(a: f32[N, H]) -> f32[N, H] {
            return scan(a, a, axis=0)
        }
        """))
    expect(err, 4, 17, "scan's first argument must name a layer", hint="layer lin(")


def test_scan_combine_arity():
    err = load_error(HEAD + LIN + src("""\
        layer f(a: f32[N, H]) -> f32[N, H] {
            return scan(lin, a, axis=0)
        }
        """))
    expect(err, 7, 17, "the combine 'lin' must take 2 tensors (the 1 carries, then the 1 elements) and return 1")


def test_scan_combine_must_keep_the_carried_types():
    err = load_error(HEAD + src("""\
        layer bad(a: f32[H], b: f32[H]) -> i32[H] {
            return i32(a + b)
        }
        layer f(a: f32[N, H]) -> f32[N, H] {
            return scan(bad, a, axis=0)
        }
        """))
    expect(err, 7, 12, "the combine 'bad' returns i32[H] as its value 0; the scan carries f32[H] there")


def test_scan_combine_rank_mismatch_points_at_the_operand():
    err = load_error(HEAD + LIN + src("""\
        layer f(a: f32[N, H, K], b: f32[N, H, K]) -> f32[N, H, K] {
            d, h = scan(lin, a, b, axis=0)
            return h
        }
        """))
    expect(err, 7, 22, "argument 'a1' of lin() must have rank 1 ([H]), got [H, K]")


def test_scan_operands_must_broadcast():
    err = load_error(HEAD + LIN + src("""\
        layer f(a: f32[N, H], b: f32[N, K]) -> f32[N, H] {
            d, h = scan(lin, a, b, axis=0)
            return h
        }
        """))
    expect(err, 7, 12, "scan(): the operands' shapes [N, H], [N, K] do not broadcast")


def test_cumsum_axis_out_of_range():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H]) -> f32[N, H] {
            return cumsum(x, axis=2)
        }
        """))
    expect(err, 4, 12, "axis 2 is out of range for a tensor of rank 2")


def test_cumprod_of_bools():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H]) -> bool[N, H] {
            return cumprod(x > 0.0, axis=0)
        }
        """))
    expect(err, 4, 12, "cumprod() does not take bool tensors")


def test_conv_filter_shape():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], w: f32[K, H]) -> f32[N, H] {
            y, s = conv1d_causal(x, w, axis=0)
            return y
        }
        """))
    expect(err, 4, 29, "the filter [K, H] must be x's shape without the axis, [H], then the taps")


def test_conv_state_shape():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], w: f32[H, K], state s: f32[K, H]) -> f32[N, H] {
            y, s = conv1d_causal(x, w, axis=0, state=s)
            return y
        }
        """))
    expect(err, 4, 46, "the state must be f32[K-1, H]")


def test_conv_filter_dtype():
    err = load_error(HEAD + src("""\
        layer f(x: bf16[N, H], w: f32[H, K]) -> bf16[N, H] {
            y, s = conv1d_causal(x, w, axis=0)
            return y
        }
        """))
    expect(err, 4, 29, "the filter must be a bf16 tensor like x", hint="T(w)")


def test_conv_of_one_tap():
    err = specialise_error(HEAD + src("""\
        layer f(x: f32[N, H], w: f32[H, K]) -> f32[N, H] {
            y, s = conv1d_causal(x, w, axis=0)
            return y
        }
        """), "f", H=4, K=1)
    expect(err, 4, 29, "the filter needs at least two taps")


def test_state_is_a_soft_keyword():
    err = load_error(HEAD + src("""\
        layer f(x: f32[N, H], state: f32[H]) -> f32[N, H] {
            return x
        }
        """))
    assert err.diagnostics[0].span.line == 3 and "':'" in err.diagnostics[0].message, str(err)
