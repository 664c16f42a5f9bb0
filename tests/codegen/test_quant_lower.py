"""Quantised product layers written in the DSL (dsl/stdlib/quant.lf) lower to the quantised
small-token product: an i8 weight dequantised by its row scales, T(f32(q) * f32(unsqueeze(s, 1))),
is the kernel's i8 layout (codegen/gemv.py wtype i8, group 0) with the same prologue / epilogue
fusions as a float weight; the forms it does not serve (other scale shapes, weight-only fp8) are
LoweringErrors at their source position and run the reference evaluator; the W8A8 layer with one
activation scale a token is matched (LinearPattern xquant "token", no small-token plan: its module
runs runtime/quant.py's fp8_linear_per_token), its near misses positioned errors; the
kernels compile without spills for sm_80 / sm_90; a LayerModule of them runs the evaluator's
meaning on the CPU. The 4-bit layers (u4 with zero points, i4 symmetric, scales by group of K)
lower to the u4 product (i4 as q + 8 with zero point 8), their module repacking the layer's packed
tensors into the kernel's layout (runtime/layers.py _quant_weight)."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.codegen.families import plans_for_layer
from layerforge.codegen.linear_lower import LinearPattern, match_linear, plan_linear
from layerforge.codegen.plan import LoweringError

from ..seeding import seeded_generator

DIMS = {"H": 1024, "F": 1536, "I": 1024, "O": 768}
QUANT = {
    "int8_linear": dict(x="x", weight="wq", wscale="ws", n=768, k=1024),
    "int8_linear_residual": dict(x="x", weight="wq", wscale="ws", n=1024, k=1024, residual="res"),
    "rms_norm_int8_gate_up_swiglu": dict(x="x", weight="wq", wscale="ws", n=3072, k=1024, gated="silu",
                                         norm_weight="gamma", eps="eps"),
}


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def specialise(prog, name, dtype="bf16"):
    return prog.specialise(name, dtype=dtype, **prog.bindings_for(name, DIMS))


@pytest.mark.parametrize("name", list(QUANT))
def test_int8_layers_lower_to_the_quantised_product(prog, name):
    layer = specialise(prog, name)
    assert match_linear(layer) == LinearPattern(dtype="bf16", wtype="i8", **QUANT[name])
    plans = plans_for_layer(layer, "sm_90")
    assert [p.max_m for p in plans] == [8, 16] and all(p.wtype == "i8" and p.group == 0 for p in plans)
    assert "_i8ch" in plan_linear(layer, "sm_90").key


HEAD = "dims K, O\ndynamic N\n"
REFUSED = [   # (parameters, body, what the error says, its line: 4 the expression, 3 an input's declaration)
    ("x: T[N, K], q: i8[O, K], s: T[K]", "return linear(x, T(f32(q) * f32(unsqueeze(s, 0))))",
     "lower as one per row", 4),
    ("x: T[N, K], q: i8[O, K], s: T[O, K]", "return linear(x, T(f32(q) * f32(s)))", "lower as one per row", 3),
    ("x: T[N, K], q: f8e4m3[O, K], s: T[O]", "return linear(x, T(f32(q) * f32(unsqueeze(s, 1))))",
     "W8A8 products", 3),
    ("x: T[N, K], q: i8[O, K], s: T[O]", "return linear(x, T(f32(q) * f32(unsqueeze(s, 1)) * 2.0))",
     "f32(q) * f32(unsqueeze(s, 1))", 4),
    ("x: T[N, K], q: i8[O, K], s: f32[O]", "return linear(x, T(f32(q) * unsqueeze(s, 1)))",
     "input 's' is f32", 3),
]


@pytest.mark.parametrize("params,body,message,line", REFUSED, ids=[r[1] for r in REFUSED])
def test_forms_the_kernel_does_not_serve_are_positioned_lowering_errors(tmp_path, params, body, message, line):
    path = tmp_path / "q.lf"
    path.write_text(HEAD + f"layer f({params}) -> T[N, O] {{\n    {body}\n}}\n")
    layer = lf.load(path).specialise("f", K=64, O=48, dtype="bf16")
    with pytest.raises(LoweringError) as info:
        match_linear(layer)
    text = str(info.value)
    assert message in text, text
    assert f"{path}:{line}:" in text and "^" in text, text   # file:line:col, the source line and a caret


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_the_w8a8_per_token_layer_lowers_to_the_fp8_product(prog, dtype):
    """fp8_linear_per_token: x quantised to e4m3 per token in the layer, an e4m3 weight with f32 row
    scales: LinearPattern xquant "token". It has no small-token plan (the e4m3 kernels quantise x by
    1 x 128 blocks), so plans for a pack are a LoweringError saying so; the module runs it."""
    from layerforge.runtime.layers import module
    layer = specialise(prog, "fp8_linear_per_token", dtype)
    pattern = match_linear(layer)
    assert pattern == LinearPattern(x="x", weight="wq", n=768, k=1024, dtype=dtype, wtype="f8e4m3", wscale="ws",
                                    xquant="token")
    assert LinearPattern(**pattern.to_json()) == pattern   # a pack's manifest reads it back
    for plans in (lambda: pattern.plan("sm_90"), lambda: plans_for_layer(layer, "sm_90")):
        with pytest.raises(LoweringError, match="no small-token kernel .* 1 x 128 blocks, another meaning"):
            plans()
    assert module("fp8_linear_per_token", I=256, O=96, dtype=dtype).kernel_reason is None


TOKEN_BODY = ("    xf = f32(x)\n    amax = max(abs(xf), axis=-1)\n"
              "    q = f8e4m3(xf * where(amax > 0.0, 448.0 / amax, 0.0))\n"
              "    return T((f32(q) * (amax * (1.0 / 448.0))) @ (f32(wq) * unsqueeze(ws, 1)).T)\n")
TOKEN_REFUSED = [   # (parameters, (old, new) in TOKEN_BODY, what the error says, its line)
    ("ws: f32[O]", ("448.0 / amax", "240.0 / amax"), "the e4m3 range a token's largest |x| maps to must be the "
     "constant 448.0", 6),
    ("ws: f32[O]", ("axis=-1", "axis=0"), "amax is over the last axis", 5),
    ("ws: f32[O]", ("amax * (1.0 / 448.0)", "amax / 448.0"), "a token's scale is amax * (1.0 / 448.0)", 7),
    ("ws: f32[K]", ("unsqueeze(ws, 1)", "unsqueeze(ws, 0)"), "the scales of 'wq' lower as one a row", 7),
    ("ws: f32[O / G, K / G]", ("(f32(wq) * unsqueeze(ws, 1))", "reshape(reshape(f32(wq), O / G, G, K / G, G) * "
                                 "reshape(ws, O / G, 1, K / G, 1), O, K)"), "W8A8's weight lowers as", 7),   # blocks
    ("ws: T[O]", ("unsqueeze(ws, 1)", "f32(unsqueeze(ws, 1))"), "input 'ws' is bf16; W8A8's weight scales are f32",
     3),
    ("ws: f32[O], b: T[O]", ("return T(", "return b + T("), "lowers alone", 7),
    ("ws: f32[O]", ("f8e4m3(xf", "f8e5m2(xf"), "x quantises to f8e4m3", 6),
]


@pytest.mark.parametrize("params,edit,message,line", TOKEN_REFUSED,
                         ids=["range", "axis", "division", "columns", "blocks", "T-scales", "bias", "e5m2"])
def test_w8a8_near_misses_are_positioned_lowering_errors(tmp_path, params, edit, message, line):
    """A layer that quantises its activations but not exactly as fp8_linear_per_token does (another
    range, amax over another axis, the scale as a division, weight scales not one a row or not f32, a
    bias, e5m2) is a LoweringError at the expression (or the input's declaration), saying the form."""
    path = tmp_path / "q.lf"
    body = TOKEN_BODY.replace(*edit)
    path.write_text("dims K, O, G\ndynamic N\n" + f"layer f(x: T[N, K], wq: f8e4m3[O, K], {params}) -> T[N, O] "
                    f"{{\n{body}}}\n")
    layer = lf.load(path).specialise("f", K=64, O=48, G=16, dtype="bf16")
    with pytest.raises(LoweringError) as info:
        match_linear(layer)
    text = str(info.value)
    assert message in text, text
    assert "W8A8 with one scale a token lowers as" in text or "W8A8's weight lowers as" in text, text   # the form
    assert f"{path}:{line}:" in text and "^" in text, text   # file:line:col, the source line and a caret


def check_w8a8_module(m, x, n, tol, *, rtol, atol):
    """A W8A8 module on CPU tensors into a NaN-poisoned out=: the evaluator's values (rtol, atol relative to
    their largest), the float64 evaluator within tol, row 4 (a token of zeros) zeros."""
    tensors = {"x": x, "wq": m.wq, "ws": m.ws}
    (want,) = lf.evaluate(m.function, tensors)
    (exact,) = lf.evaluate(m.function, tensors, precision="float64")
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype)
    y = m(x, out=(out,))
    assert y is out and not torch.isnan(y).any() and y[4].abs().max() == 0
    torch.testing.assert_close(y, want, rtol=rtol, atol=atol * want.abs().max().item())
    assert ((y.double() - exact).norm() / exact.norm()).item() < tol


def test_the_w8a8_module_on_the_cpu_is_the_evaluators():
    """module("fp8_linear_per_token") on CPU tensors: x quantised per token as quantize_fp8_rows(x, K),
    the f32 product, rounded once: the reference evaluator's values on fresh inputs (bf16 and f16, a
    token of zeros, K not a multiple of 16), into out= too; the float64 evaluator within the dtype's
    rounding; the weight's layout made once per weight; a wrong input is an error naming it."""
    from layerforge.dsl.evaluator import LayerInputError
    from layerforge.runtime.layers import module
    from layerforge.runtime.quant import quantize_fp8
    for dt, dtype, tol in (("bf16", torch.bfloat16, 4e-3), ("f16", torch.float16, 1e-3)):
        for k, n in ((256, 96), (200, 40)):
            m = module("fp8_linear_per_token", I=k, O=n, dtype=dt)
            assert m.kernel_reason is None and m.wq.dtype == torch.float8_e4m3fn and m.ws.dtype == torch.float32
            assert m._token_product()   # runtime/quant.py's route on CPU tensors too, not the evaluator
            gen = seeded_generator("quant-module-fp8-token", dt, k)
            wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None])
            with torch.no_grad():
                m.wq.copy_(wq)
                m.ws.copy_(ws)
            x = (torch.randn(9, k, generator=gen) * torch.logspace(-2, 2, 9)[:, None]).to(dtype)
            x[4] = 0
            check_w8a8_module(m, x, n, tol, rtol=2 ** -8, atol=1e-6)
            qw = m._quant_weight(m._linear, {"wq": m.wq, "ws": m.ws}, dtype)
            assert m._quant_weight(m._linear, {"wq": m.wq, "ws": m.ws}, dtype) is qw
            with torch.no_grad():
                m.ws.mul_(2)
            (want,) = lf.evaluate(m.function, {"x": x, "wq": m.wq, "ws": m.ws})   # the next call reads the new scales
            torch.testing.assert_close(m(x), want, rtol=2 ** -8, atol=1e-6 * want.abs().max().item())
            with pytest.raises(LayerInputError, match="'x' must be"):
                m(x.float())


@pytest.mark.parametrize("max_m", [8, 16])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", list(QUANT))
def test_int8_layers_compile_without_spills(prog, name, arch, max_m):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    plan = plan_linear(specialise(prog, name), arch, max_m=max_m)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert res.cubin[:4] == b"\x7fELF"
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_module_of_an_int8_layer_on_the_cpu_is_the_evaluators():
    """module("int8_linear"): weights wq (int8) and ws (T) as parameters under their DSL names, a
    kernel on CUDA tensors (kernel_reason None), the reference evaluator on CPU tensors."""
    from layerforge.runtime.layers import module
    from layerforge.runtime.quant import pack_i8, quantize_i8
    m = module("int8_linear", I=256, O=96, dtype="bf16")
    assert m.kernel_reason is None and m.wq.dtype == torch.int8 and m.ws.dtype == torch.bfloat16
    gen = seeded_generator("quant-module")
    qw = pack_i8(*quantize_i8(torch.randn(96, 256, generator=gen) / 16, 0), 0, torch.bfloat16)
    with torch.no_grad():
        m.wq.copy_(qw.qweight)
        m.ws.copy_(qw.wscale)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    ref = x.double() @ (qw.qweight.double() * qw.wscale.double()[:, None]).T
    y = m(x)
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).norm() / ref.norm()).item() < 4e-3


FOUR = {"u4_linear": dict(x="x", weight="wq", wscale="ws", wzero="wz", wtype="u4"),
        "i4_linear": dict(x="x", weight="wq", wscale="ws", wtype="i4")}


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("name", list(FOUR))
def test_4_bit_layers_lower_to_the_u4_product(prog, name, group):
    layer = prog.specialise(name, dtype="bf16", **prog.bindings_for(name, {"I": 1024, "O": 768, "G": group}))
    pattern = match_linear(layer)
    assert pattern == LinearPattern(dtype="bf16", n=768, k=1024, group=group, **FOUR[name])
    assert pattern.kernel_wtype == "u4"
    plans = plans_for_layer(layer, "sm_90")
    assert [p.max_m for p in plans] == [8, 16] and all(p.wtype == "u4" and p.group == group for p in plans)
    assert LinearPattern(**pattern.to_json()) == pattern   # a pack's manifest reads it back


FOUR_REFUSED = [
    ("x: T[N, K], q: u4[O, K], s: T[O, K / G]", "return linear(x, T(reshape(f32(reshape(q, O, K / G, G)) * "
     "f32(unsqueeze(s, 2)), O, K)))", "a weight with scales by group of K lowers as", 4),          # u4 without its zero points
    ("x: T[N, K], q: i4[O, K], s: T[O, K / G], z: u4[O, K / G]", "return linear(x, T(reshape((f32(reshape(q, O, "
     "K / G, G)) - f32(unsqueeze(z, 2))) * f32(unsqueeze(s, 2)), O, K)))", "a weight with scales by group of K lowers as", 4),
    ("x: T[N, K], q: u4[O, K], s: f32[O, K / G], z: u4[O, K / G]", "return linear(x, T(reshape((f32(reshape(q, O, "
     "K / G, G)) - f32(unsqueeze(z, 2))) * unsqueeze(s, 2), O, K)))", "input 's' is f32", 3),
]


@pytest.mark.parametrize("params,body,message,line", FOUR_REFUSED, ids=["no-zeros", "i4-zeros", "f32-scales"])
def test_4_bit_forms_the_kernel_does_not_serve_are_positioned_errors(tmp_path, params, body, message, line):
    path = tmp_path / "q.lf"
    path.write_text("dims K, O, G\ndynamic N\n" + f"layer f({params}) -> T[N, O] {{\n    {body}\n}}\n")
    layer = lf.load(path).specialise("f", K=256, O=48, G=64, dtype="bf16")
    with pytest.raises(LoweringError) as info:
        match_linear(layer)
    text = str(info.value)
    assert message in text and f"{path}:{line}:" in text and "^" in text, text


@pytest.mark.parametrize("name", list(FOUR))
def test_4_bit_layers_compile_without_spills(prog, name):
    nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
    layer = prog.specialise(name, dtype="bf16", **prog.bindings_for(name, {"I": 4096, "O": 1024, "G": 128}))
    for plan in plans_for_layer(layer, "sm_90"):
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


def test_module_of_a_u4_layer_holds_packed_weights_and_is_the_evaluators_on_the_cpu():
    """module("u4_linear"): wq uint8 [O, I / 2], wz uint8 [O, I / G / 2] (packed two a byte), ws in T; the
    CPU runs the evaluator; the kernel layout repacked from them dequantises to the layer's W, and once
    per weight (a rewrite in place repacks)."""
    from layerforge.dsl.types import pack_4bit
    from layerforge.runtime.layers import module
    from layerforge.runtime.quant import dequantize
    m = module("u4_linear", I=256, O=96, G=64, dtype="bf16")
    assert m.kernel_reason is None and m.wq.shape == (96, 128) and m.wq.dtype == torch.uint8
    assert m.wz.shape == (96, 2) and m.ws.shape == (96, 4) and m.ws.dtype == torch.bfloat16
    gen = seeded_generator("quant-module-u4")
    q, z = torch.randint(0, 16, (96, 256), generator=gen), torch.randint(0, 16, (96, 4), generator=gen)
    s = (torch.rand(96, 4, generator=gen) / 64).to(torch.bfloat16)
    with torch.no_grad():
        m.wq.copy_(pack_4bit(q))
        m.wz.copy_(pack_4bit(z))
        m.ws.copy_(s)
    w = (q - z.repeat_interleave(64, 1)).double() * s.double().repeat_interleave(64, 1)
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    y = m(x)
    ref = x.double() @ w.T
    assert y.dtype == torch.bfloat16 and ((y.double() - ref).norm() / ref.norm()).item() < 4e-3
    tensors = {"wq": m.wq, "ws": m.ws, "wz": m.wz}
    qw = m._quant_weight(m._linear, tensors, torch.bfloat16)
    assert torch.equal(dequantize(qw), w) and m._quant_weight(m._linear, tensors, torch.bfloat16) is qw
    with torch.no_grad():
        m.ws.mul_(2)
    assert torch.equal(dequantize(m._quant_weight(m._linear, tensors, torch.bfloat16)), 2 * w)


def test_row_layers_of_quantised_types_are_clear_lowering_errors(prog):
    """A layer that is no product but reads or writes a quantised type (the u4 group quantiser) has no
    row kernel: a LoweringError naming the type (its module runs the evaluator), not a lookup failure."""
    from layerforge.runtime.layers import module
    layer = prog.specialise("quantize_u4_groups", dtype="f32", **prog.bindings_for("quantize_u4_groups",
                                                                                   {"I": 256, "O": 64, "G": 64}))
    with pytest.raises(LoweringError, match="an output is u4: the quantised types lower only as the weight"):
        plans_for_layer(layer, "sm_90")
    m = module("quantize_u4_groups", I=256, O=64, G=64, dtype="f32")
    assert "quantised types" in m.kernel_reason
    with torch.no_grad():   # w [O, I] is static: a weight of the module
        getattr(m, m._weights["w"]).copy_(torch.randn(64, 256, generator=seeded_generator("u4-row-module")))
    q, s, z = m()
    assert q.shape == (64, 128) and q.dtype == torch.uint8 and s.shape == (64, 4) and z.shape == (64, 2)



def test_group_int8_layer_lowers_to_the_i8_group_product(prog):
    """int8 weights with scales by group of K: the i8 product's group layout (pack_i8's pairs, made once
    per weight by the module), which dequantises to the layer's W."""
    from layerforge.runtime.layers import module
    from layerforge.runtime.quant import dequantize
    dims = prog.bindings_for("int8_group_linear", {"I": 512, "O": 96, "G": 64})
    layer = prog.specialise("int8_group_linear", dtype="bf16", **dims)
    pattern = match_linear(layer)
    assert (pattern.wtype, pattern.group, pattern.wscale, pattern.kernel_wtype) == ("i8", 64, "ws", "i8")
    assert all(p.wtype == "i8" and p.group == 64 for p in plans_for_layer(layer, "sm_90"))
    m = module("int8_group_linear", dtype="bf16", **dims)
    assert m.kernel_reason is None
    gen = seeded_generator("quant-module-i8-group")
    with torch.no_grad():
        m.wq.copy_(torch.randint(-127, 128, (96, 512), generator=gen).to(torch.int8))
        m.ws.copy_((torch.rand(96, 8, generator=gen) / 256).to(torch.bfloat16))
    tensors = {"wq": m.wq, "ws": m.ws}
    (w_ref,) = lf.evaluate(layer.function, {"x": torch.eye(512, dtype=torch.bfloat16), **tensors}, precision="float64")
    torch.testing.assert_close(dequantize(m._quant_weight(m._linear, tensors, torch.bfloat16)), w_ref.T,
                               rtol=0, atol=0)   # x = I: the product is W^T itself


def test_the_fp8_block_layer_runs_the_reference_evaluator(prog):
    layer = prog.specialise("fp8_block_linear", dtype="bf16", **prog.bindings_for("fp8_block_linear",
                                                                                 {"I": 512, "O": 256, "G": 128}))
    with pytest.raises(LoweringError, match="an fp8 weight lowers only in the W8A8 products") as info:
        match_linear(layer)
    assert "quant.lf:" in str(info.value) and "^" in str(info.value)   # at wq's declaration
    from layerforge.runtime.layers import module
    assert "W8A8" in module("fp8_block_linear", I=512, O=256, G=128, dtype="bf16").kernel_reason


BLOCK_BODY = ("    xg = reshape(f32(x), N, K / G, G)\n    amax = max(abs(xg), axis=-1)\n"
              "    q = f8e4m3(xg * where(amax > 0.0, 448.0 / amax, 0.0))\n"
              "    xd = reshape(f32(q) * (amax * (1.0 / 448.0)), N, K)\n"
              "    w = reshape(f32(wq), O / G, G, K / G, G) * reshape(ws, O / G, 1, K / G, 1)\n"
              "    return T(xd @ reshape(w, O, K).T)\n")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_the_w8a8_block_layer_lowers_to_the_block_scaled_product(prog, dtype):
    """fp8_block_w8a8_linear (DeepSeek-V3's W8A8: x by 1 x 128 blocks, W by 128 x 128 blocks) at G = 128:
    LinearPattern xquant "k128", wtype f8e4m3, group 128; no plan a pack holds (like the per-token form);
    the module's route is runtime/quant.py gemv_quant over pack_fp8(block=128)."""
    from layerforge.runtime.layers import module
    layer = prog.specialise("fp8_block_w8a8_linear", I=1024, O=768, G=128, dtype=dtype)
    pattern = match_linear(layer)
    assert pattern == LinearPattern(x="x", weight="wq", n=768, k=1024, dtype=dtype, wtype="f8e4m3", wscale="ws",
                                    group=128, xquant="k128")
    assert LinearPattern(**pattern.to_json()) == pattern
    with pytest.raises(LoweringError, match="128 x 128 weight blocks has no small-token kernel a pack holds"):
        pattern.plan("sm_90")
    assert module("fp8_block_w8a8_linear", I=256, O=384, G=128, dtype=dtype).kernel_reason is None


BLOCK_REFUSED = [   # ((old, new) in BLOCK_BODY, G, what the error says, its line)
    (("448.0 / amax", "240.0 / amax"), 128, "the e4m3 range a token's largest |x| maps to must be the constant 448.0",
     6),
    (("amax * (1.0 / 448.0)", "amax / 448.0"), 128, "a token's scale is amax * (1.0 / 448.0)", 7),
    (("reshape(ws, O / G, 1, K / G, 1)", "reshape(ws, O / G, 1, K / G, 1) * 2.0"), 128, "block-scaled weight", 8),
    (("", ""), 64, "blocks of 128", 7),
]


@pytest.mark.parametrize("edit,g,message,line", BLOCK_REFUSED, ids=["range", "division", "weight", "g64"])
def test_w8a8_block_near_misses_are_positioned_lowering_errors(tmp_path, edit, g, message, line):
    path = tmp_path / "q.lf"
    body = BLOCK_BODY.replace(*edit) if edit[0] else BLOCK_BODY
    path.write_text("dims K, O, G\ndynamic N\nlayer f(x: T[N, K], wq: f8e4m3[O, K], ws: f32[O / G, K / G]) -> T[N, O] "
                    f"{{\n{body}}}\n")
    layer = lf.load(path).specialise("f", K=256, O=384, G=g, dtype="bf16")
    with pytest.raises(LoweringError) as info:
        match_linear(layer)
    text = str(info.value)
    assert message in text and "W8A8 with 128 x 128 weight blocks lowers as" in text, text
    assert f"{path}:{line}:" in text and "^" in text, text


def test_the_w8a8_block_module_on_the_cpu_is_the_evaluators():
    """module("fp8_block_w8a8_linear") on CPU tensors (gemv_quant's torch route): the reference evaluator's
    values on fresh inputs (bf16 and f16, a token of zeros, a block of zeros, blocks of very different
    scales), into out= too; the float64 evaluator within the dtype's rounding."""
    from layerforge.runtime.layers import module
    from layerforge.runtime.quant import quantize_fp8
    for dt, dtype, tol in (("bf16", torch.bfloat16, 4e-3), ("f16", torch.float16, 1e-3)):
        for k, n in ((256, 384), (512, 128)):
            m = module("fp8_block_w8a8_linear", I=k, O=n, G=128, dtype=dt)
            assert m.kernel_reason is None and m._token_product()
            gen = seeded_generator("quant-module-fp8-blocks", dt, k)
            wq, ws = quantize_fp8(torch.randn(n, k, generator=gen) / k ** 0.5 * torch.logspace(-1, 1, n)[:, None],
                                  block=128)
            with torch.no_grad():
                m.wq.copy_(wq)
                m.ws.copy_(ws)
            x = (torch.randn(9, k, generator=gen) * torch.logspace(-2, 2, 9)[:, None]).to(dtype)
            x[4] = 0
            x[5, :128] = 0
            x[6, 128:] *= 1e-3
            check_w8a8_module(m, x, n, tol, rtol=2 ** -7, atol=1e-5)
