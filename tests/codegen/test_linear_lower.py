"""Product layers lower to the small-token product (codegen/linear_lower.py): each stdlib
product layer and each way of writing one maps to the plan_gemv flags it means; what does not
fuse is a LoweringError naming the expression at its source position; every stdlib product
layer's kernels render and compile for sm_80 and sm_90 without spills (no GPU needed)."""
from __future__ import annotations

import pytest

import layerforge as lf
from layerforge.codegen.families import plans_for_layer
from layerforge.codegen.linear_lower import LinearPattern, match_linear, plan_linear
from layerforge.codegen.plan import LoweringError

# the stdlib's product layers, their bindings and the pattern each lowers to
DIMS = {"H": 1024, "F": 1536, "I": 1024, "O": 768}
STDLIB = {
    "linear_layer": dict(x="x", weight="w", n=768, k=1024),
    "linear_bias": dict(x="x", weight="w", n=768, k=1024, bias="b"),
    "linear_residual": dict(x="x", weight="w", n=1024, k=1024, residual="res"),
    "rms_norm_linear": dict(x="x", weight="w", n=768, k=1024, norm_weight="gamma", eps="eps"),
    "gemma_rms_norm_linear": dict(x="x", weight="w", n=768, k=1024, norm_weight="gamma", eps="eps", norm_offset=1.0),
    "gate_up_swiglu": dict(x="x", weight="w", n=3072, k=1024, gated="silu"),
    "rms_norm_gate_up_swiglu": dict(x="x", weight="w", n=3072, k=1024, gated="silu", norm_weight="gamma", eps="eps"),
    "gemma_rms_norm_gate_up_geglu": dict(x="x", weight="w", n=3072, k=1024, gated="gelu_tanh", norm_weight="gamma",
                                         eps="eps", norm_offset=1.0),
}
KEYS = {
    "linear_layer": "gemv_n768_k1024_m16_bf16_r1w4s4_sm90",
    "linear_bias": "gemv_n768_k1024_m16_bf16_bias_r1w4s4_sm90",
    "linear_residual": "gemv_n1024_k1024_m16_bf16_res_r1w4s4_sm90",
    "rms_norm_linear": "gemv_n768_k1024_m16_bf16_rms_r1w4s4_sm90",
    "gemma_rms_norm_linear": "gemv_n768_k1024_m16_bf16_rms1p_r1w4s4_sm90",
    "gate_up_swiglu": "gemv_n3072_k1024_m16_bf16_silu_r1w8s3_sm90",
    "rms_norm_gate_up_swiglu": "gemv_n3072_k1024_m16_bf16_silu_rms_r1w8s3_sm90",
    "gemma_rms_norm_gate_up_geglu": "gemv_n3072_k1024_m16_bf16_gelu_tanh_rms1p_r1w8s3_sm90",
}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def specialise(prog, name, dtype="bf16"):
    return prog.specialise(name, dtype=dtype, **prog.bindings_for(name, DIMS))


@pytest.mark.parametrize("name", list(STDLIB))
def test_stdlib_product_layer_pattern_and_plan_key(prog, name):
    layer = specialise(prog, name)
    assert match_linear(layer) == LinearPattern(dtype="bf16", **STDLIB[name])
    assert plan_linear(layer, "sm_90").key == KEYS[name]
    assert [p.max_m for p in plans_for_layer(layer, "sm_90")] == [8, 16]


def test_f16_plans_are_f16(prog):
    assert plan_linear(specialise(prog, "linear_bias", "f16"), "sm_80").key == \
        "gemv_n768_k1024_m16_f16_bias_r1w4s4_sm80"


# ---- the ways of writing a product layer --------------------------------------------------
HEAD = "dims H, O, F, K\ndynamic N\n"
WRITTEN = {
    # the four examples
    "layer qkv_proj(x: T[N, H], w: T[O, H], g: T[H], eps: f32 = 1e-5) -> T[N, O] {\n"
    "    return rms_norm(x, g, eps) @ w.T\n}":
        dict(x="x", weight="w", n=48, k=64, norm_weight="g", eps="eps"),
    "layer gate_up(x: T[N, H], w: T[2*F, H]) -> T[N, F] { return swiglu(x @ w.T) }":
        dict(x="x", weight="w", n=64, k=64, gated="silu"),
    "layer o_proj(a: T[N, K], w: T[H, K], r: T[N, H]) -> T[N, H] { return r + a @ w.T }":
        dict(x="a", weight="w", n=64, k=16, residual="r"),
    "layer biased(x: T[N, K], w: T[O, K], b: T[O]) -> T[N, O] { return x @ w.T + b }":
        dict(x="x", weight="w", n=48, k=16, bias="b"),
    # terms and factors in other orders, explicit casts, a constant eps, bias and residual together
    "layer f(x: T[N, K], w: T[O, K], b: T[O], r: T[N, O]) -> T[N, O] { return b + (r + T(f32(x) @ f32(w).T)) }":
        dict(x="x", weight="w", n=48, k=16, bias="b", residual="r"),
    "layer f(x: T[N, H], w: T[2*F, H], b: T[2*F], r: T[N, F]) -> T[N, F] {\n"
    "    gate, up = split(linear(x, w, b), 2)\n    return r + up * gelu(gate)\n}":
        dict(x="x", weight="w", n=64, k=64, gated="gelu", bias="b", residual="r"),
    "layer f(x: T[N, H], w: T[O, H], g: T[H]) -> T[N, O] {\n"
    "    xf = f32(x)\n    return linear(T(xf * rsqrt(mean(xf * xf) + 1e-5) * (1.0 + f32(g))), w)\n}":
        dict(x="x", weight="w", n=48, k=64, norm_weight="g", eps=1e-5, norm_offset=1.0),
}


@pytest.mark.parametrize("text", list(WRITTEN), ids=range(len(WRITTEN)))
def test_written_forms_map_to_their_flags(text):
    prog = lf.loads(HEAD + text, "m.lf")
    (name,) = [n for n in prog.names if prog.definition(n).span.file == "m.lf"]
    layer = prog.specialise(name, H=64, O=48, F=32, K=16, dtype="bf16")
    assert match_linear(layer) == LinearPattern(dtype="bf16", **WRITTEN[text])


# ---- what does not fuse: positioned errors ------------------------------------------------
UNFUSED = [
    ("return relu(x @ w.T)", "relu(...) around the product cannot be fused", 12),
    ("return T(2.0 * (x @ w.T))", "fuses only as a gated activation", 14),
    ("return x @ v", "must be a weight's transpose", 12),
    ("return (x @ w.T) @ u.T", "2 matrix products", 12),
    ("return x @ w.T + r2", "+ input 'r2' cannot be fused", 12),
    ("return linear(x * x, w)", "a product before the product cannot be fused", 19),
    ("return silu(x @ w.T) * (x @ w.T)", "2 matrix products", 29),
]


@pytest.mark.parametrize("body,message,col", UNFUSED, ids=[u[0] for u in UNFUSED])
def test_unfused_products_are_positioned_lowering_errors(tmp_path, body, message, col):
    path = tmp_path / "m.lf"
    path.write_text(HEAD + "layer f(x: T[N, K], w: T[O, K], v: T[K, O], u: T[O, O], r2: T[1, O]) -> T[N, O] {\n"
                    f"    {body}\n}}\n")
    layer = lf.load(path).specialise("f", K=16, O=48, dtype="bf16")
    with pytest.raises(LoweringError) as info:
        match_linear(layer)
    text = str(info.value)
    assert message in text, text
    assert f"{path}:4:{col}: " in text, text
    assert f"\n        {body}\n" + " " * (4 + col - 1) + "^" in text, text   # the line and a caret under the column


def test_f32_product_layers_are_not_lowered(prog):
    with pytest.raises(LoweringError, match="bf16 or f16, not f32"):
        match_linear(specialise(prog, "linear_layer", "f32"))


def test_k_not_a_multiple_of_8_is_a_lowering_error(prog):
    layer = prog.specialise("linear_layer", I=60, O=64, dtype="bf16")
    with pytest.raises(LoweringError, match="multiple of 8"):
        plan_linear(layer, "sm_90")


@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", list(STDLIB))
def test_stdlib_product_layers_compile_without_spills(prog, name, arch, max_m):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    plan = plan_linear(specialise(prog, name), arch, max_m=max_m)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert res.cubin[:4] == b"\x7fELF"
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
