"""Programs the code-generator fuzzer (tests/fuzz) found: each checks and evaluates, and used
to fail only at build time or to crash. Minimal forms, compiled with NVRTC (no GPU needed)."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.families import plans_for_layer

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


def builds(layer, arch="sm_90"):
    for plan in plans_for_layer(layer, arch):
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))   # sm_90a: wgmma
        assert {k.name for k in plan.kernels} <= set(res.resources)


MIXED_INT_ROW = """
dims H
dynamic N
layer mixed(i: i32[N, H], big: i64[N, 1], const c: int = 3) -> (i64[N, H], i64[N, H]) {
    m = max(i64(i) // 3, i64(c)) % 5
    return m + min(big, 2), max(big, -1) - i64(i)
}
"""


def test_row_integer_min_max_floordiv_mod_relu_with_literals_of_another_width_compile():
    """A row kernel's i64 `max(x, 3)`, `x // 3`, `x % 5`: both operands in one type
    (`max(long long, int)` is ambiguous, the floor helpers are templates of one type)."""
    layer = lf.loads(MIXED_INT_ROW, with_stdlib=False).specialise("mixed", H=7)
    builds(layer)
    i = torch.arange(-7, 7, dtype=torch.int32).view(2, 7)
    big = torch.tensor([[5], [-9]])
    m, r = lf.evaluate(layer.function, {"i": i, "big": big})
    want = torch.maximum(i.long().div(3, rounding_mode="floor"), torch.tensor(3)).remainder(5)
    assert torch.equal(m, want + big.clamp(max=2))
    assert torch.equal(r, big.clamp(min=-1) - i.long())


def test_a_hook_local_named_like_an_extra_table_keeps_the_table_as_the_kernels_input():
    """`rel = ...` in a block with a table parameter `rel`: the block's inputs are still the
    tables (it used to give the attention node an attention variable as input: IR crash)."""
    layer = lf.loads("""
dims Hq, Hkv, D, NB
dynamic B, S, Skv
attention a(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], rel: f32[NB]) -> T[B, S, Hq, D] {
    rel = kv_pos - q_pos
    score = score + f32(rel)
}
""", with_stdlib=False).specialise("a", Hq=4, Hkv=4, D=64, NB=3, dtype="bf16")
    assert [p.name for p in layer.function.params][3:] == ["rel"]
    builds(layer)


def test_a_dim_that_the_generic_check_folds_away_is_still_bound_when_specialising():
    """`NB - NB` folds to 0 before specialisation; binding NB must not then say 'NB is unbound'."""
    layer = lf.loads("""
dims Hq, Hkv, D, NB
dynamic B, S, Skv
attention a(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    score = score + f32((NB - NB) % 3)
}
""", with_stdlib=False).specialise("a", Hq=4, Hkv=4, D=64, NB=5, dtype="bf16")
    assert layer.dims == (("D", 64), ("Hkv", 4), ("Hq", 4))   # the key names only the dims used
    builds(layer)


MASK_READS_SCORE = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention a(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    score = score * 2.0
    mask = score > -1.0 and q_pos >= kv_pos
}
"""


def test_a_mask_that_reads_the_score_compiles_in_every_attention_kernel():
    """A mask reads `score` as the block has it at that point (here after the hook: its graph
    starts from the scaled q.k), as the reference does; the kernels' mask function had no
    score argument ('identifier "score" is undefined')."""
    layer = lf.loads(MASK_READS_SCORE, with_stdlib=False).specialise("a", Hq=4, Hkv=2, D=64, dtype="bf16")
    builds(layer)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, n, 64, generator=g).bfloat16() for n in (4, 2, 2))
    (out,) = lf.evaluate(layer.function, {"q": q, "k": k, "v": v}, precision="float64")
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double().repeat_interleave(2, dim=2)) / 8
    keep = (s * 2 > -1.0) & torch.ones(5, 5, dtype=torch.bool).tril()
    p = torch.where(keep, s * 2, float("-inf")).softmax(-1).nan_to_num(0.0)
    want = torch.einsum("bhij,bjhd->bihd", p, v.double().repeat_interleave(2, dim=2))
    assert torch.allclose(out.double(), want, rtol=1e-2, atol=1e-2)


WIDE_I64_REDUCTIONS = """
dims H
dynamic N
layer r(big: i64[N, H]) -> i64[N, H] {
    return big - max(big, axis=-1) + min(big, axis=-1) + sum(big, axis=-1)
}
"""


def test_i64_row_reductions_start_from_64_bit_identities_and_share_64_bit_slots():
    """An i64 max/min started from INT_MIN / INT_MAX (wrong for values beyond 32 bits), and past
    one warp the partials went through the 4-byte-aligned float array, one float per warp (a
    64-bit store overran it). tests/gpu/test_fuzz_gpu.py runs this layer on values past 2^32."""
    layer = lf.loads(WIDE_I64_REDUCTIONS, with_stdlib=False).specialise("r", H=4096)
    builds(layer)
    src = plans_for_layer(layer, "sm_90")[0].source()
    assert "INT_MIN" not in src.split("extern")[1] and "(-9223372036854775807LL - 1)" in src
    assert "__shared__ long long" in src and "lf_row_reduce<512, long long, LfMax>" in src
    big = torch.tensor([[-2**40, 3, 2**35], [5, 6, 7]])
    (out,) = lf.evaluate(lf.loads(WIDE_I64_REDUCTIONS, with_stdlib=False).specialise("r", H=3).function, {"big": big})
    assert torch.equal(out, big - big.amax(-1, keepdim=True) + big.amin(-1, keepdim=True) + big.sum(-1, keepdim=True))


WEIGHT_REDUCTION = """
dims H
dynamic N
layer fz(x: T[N, H], wf: f32[H]) -> T[N, H] {
    return T(softmax(wf, axis=-1) + max(wf, axis=-1) + f32(x) - sum(f32(x), axis=-1))
}
"""


@pytest.mark.parametrize("h", [1, 8, 4096])
def test_a_reduction_of_an_h_weight_broadcasts_over_the_rows(h):
    """A reduction of an [H] weight has no rows of its own: it broadcasts over the outputs' rows
    (each row reduces its copy). It was 'output [N, H] does not match the row space' (alone)
    or 'reductions over rows of different shapes' (beside a reduction of x)."""
    layer = lf.loads(WEIGHT_REDUCTION, with_stdlib=False).specialise("fz", H=h, dtype="bf16")
    builds(layer)
    assert plans_for_layer(layer, "sm_90")[0].describe()["rows"] == ["N"]


INT_HOOK_ARITHMETIC = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention a(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    score = score + kv_pos / 2 - f32(q_pos ** 2) / 64.0
}
"""


def test_hook_true_division_of_integers_and_integer_powers():
    """`kv_pos / 2` is f32 (true division, as in the reference) but was emitted as C's integer
    division; `q_pos ** 2` crashed the emitter (KeyError 'pow'). Integer powers take a constant
    exponent 0..64 (else a positioned error)."""
    layer = lf.loads(INT_HOOK_ARITHMETIC, with_stdlib=False).specialise("a", Hq=4, Hkv=4, D=64, dtype="bf16")
    builds(layer)
    from layerforge.codegen.attention import plan_paged_attention
    src = plan_paged_attention(layer, "sm_90").source()
    assert "((float)(kv_pos) / (float)(2))" in src and "(long long)(q_pos) * (long long)(q_pos)" in src
    with pytest.raises(lf.DSLError, match=r"m.lf:5:\d+: error: '\*\*' on an integer needs a constant exponent"):
        lf.loads(INT_HOOK_ARITHMETIC.replace("q_pos ** 2", "q_pos ** kv_pos"), "m.lf", with_stdlib=False)


INT_SCALAR_ROW = """
dims H
dynamic N
layer fz(x: f32[N, H], n: i32 = 3) -> f32[N, H] {
    return x * (n / 2) + f32(n ** 2)
}
"""


def test_row_true_division_of_an_int_scalar_and_its_integer_power():
    """The row kernels' `n / 2` (f32) was C's integer division; `n ** 2` did not lower."""
    layer = lf.loads(INT_SCALAR_ROW, with_stdlib=False).specialise("fz", H=8)
    builds(layer)
    src = plans_for_layer(layer, "sm_90")[0].source()
    assert "((float)(s_n) / (float)(2))" in src and "(long long)(s_n) * (long long)(s_n)" in src
    (out,) = lf.evaluate(layer.function, {"x": torch.ones(2, 8), "n": 3})
    assert torch.equal(out, torch.full((2, 8), 10.5))
