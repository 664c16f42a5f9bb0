"""Product layers written in the DSL (the stdlib's linear.lf) on the GPU: the small-token product
kernel for 1-16 rows, torch's product past them (40 rows), each against the reference in
float64, outputs poisoned with NaN first; a layer whose product does not fuse runs the
reference's torch operations on CUDA tensors."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime import linear
from layerforge.runtime.layers import LayerModule, module

from ..seeding import seeded_generator

pytestmark = pytest.mark.gpu

DIMS = {"H": 1024, "F": 1536, "I": 2048, "O": 768}
NAMES = ["linear_layer", "linear_bias", "linear_residual", "rms_norm_linear", "gemma_rms_norm_linear",
         "gate_up_swiglu", "rms_norm_gate_up_swiglu", "gemma_rms_norm_gate_up_geglu"]


def make(name):
    prog = lf.stdlib()
    scalars = {"eps": 1e-5} if "norm" in name else {}
    return module(name, dims=prog.bindings_for(name, DIMS), dtype="bf16", device="cuda", **scalars)


def fill(mod, gen, m):
    """Fresh weights (W / sqrt(K), gamma near 1 (near 0 for Gemma's 1 + gamma), bias) and inputs
    of m rows with per-row scales that differ (the norm's per-token rstd)."""
    with torch.no_grad():
        for pname, t in mod.named_parameters():
            if t.dim() == 2:
                v = torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5
            elif pname == "gamma":
                v = torch.randn(t.shape, generator=gen) * 0.2 + (0.0 if "gemma" in mod.name else 1.0)
            else:
                v = torch.randn(t.shape, generator=gen)
            t.copy_(v.to(t.dtype))
    params = {p.name: p for p in mod.function.params}
    scale = torch.logspace(-1, 1, m)[:, None]
    return [(torch.randn(m, int(params[n].shape[1]), generator=gen) * scale).to(torch.bfloat16).cuda()
            for n in mod.input_names]


@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("name", NAMES)
def test_product_layer_against_float64(name, m):
    mod = make(name)
    assert mod.kernel_reason is None
    args = fill(mod, seeded_generator("linear-dsl", name, m), m)
    tensors = {**dict(zip(mod.input_names, args)), **{p: getattr(mod, a) for p, a in mod._weights.items()}}
    (want,) = lf.evaluate(mod.function, {**tensors, "eps": 1e-5} if "norm" in name else tensors, precision="float64")
    out = torch.full(tuple(want.shape), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = mod(*args, out=(out,))
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any()
    err = (out.double() - want).norm() / want.norm()
    assert err < 1e-2, err
    if m <= linear.KERNEL_MAX_ROWS:   # the generated kernel of this row count was loaded (runtime/linear.py's key)
        p = mod._linear
        tiles = 8 << max(0, (m - 1).bit_length() - 3)   # the plan's token rows: 8, 16, 32 or 64
        key = (torch.bfloat16, p.n, p.k, tiles, p.gated, p.bias is not None, p.residual is not None,
               None if p.norm_weight is None else p.norm_offset, out.device.index, None, 0, 0, False)   # bf16 W: no
        # wtype, group; W packed: no row stride (ldw); not u4's shared-x layout
        assert key in linear._KERNELS


@pytest.mark.parametrize("name", ["rms_norm_gate_up_swiglu", "linear_residual"])
def test_product_layer_without_out(name):
    mod = make(name)
    args = fill(mod, seeded_generator("linear-dsl-alloc", name), 3)
    y = mod(*args)
    tensors = {**dict(zip(mod.input_names, args)), **{p: getattr(mod, a) for p, a in mod._weights.items()}}
    (want,) = lf.evaluate(mod.function, {**tensors, "eps": 1e-5} if "norm" in name else tensors, precision="float64")
    assert y.dtype == torch.bfloat16 and y.shape == want.shape and y.is_cuda
    assert (y.double() - want).norm() / want.norm() < 1e-2


def test_unfused_product_runs_the_reference_on_cuda():
    prog = lf.loads("layer scaled(x: T[N, I], w: T[O, I]) -> T[N, O] { return T(0.5 * f32(x @ w.T)) }\n", "s.lf",
                    with_stdlib=True)
    mod = LayerModule(prog.specialise("scaled", I=256, O=128, dtype="bf16"), device="cuda")
    assert mod.kernel_reason is not None
    with torch.no_grad():
        mod.weight.normal_(0, 0.05)
    x = torch.randn(4, 256, dtype=torch.bfloat16, device="cuda")
    want = (0.5 * (x.double() @ mod.weight.double().T))
    assert (mod(x).double() - want).norm() / want.norm() < 1e-2


QUANT_NAMES = ["int8_linear", "int8_linear_residual", "rms_norm_int8_gate_up_swiglu"]


@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("name", QUANT_NAMES)
def test_int8_product_layer_against_float64(name, m):
    """The stdlib's int8 layers (dsl/stdlib/quant.lf): the quantised small-token product on their
    i8 weight and row scales up to 16 rows, runtime/quant.py's longer-call route past them, against
    the layer's own dequantisation evaluated in float64, outputs poisoned with NaN first."""
    from layerforge.runtime.quant import quantize_i8
    mod = make(name)
    assert mod.kernel_reason is None and mod._linear.wtype == "i8"
    gen = seeded_generator("linear-dsl-i8", name, m)
    n, k = mod.wq.shape
    q, s = quantize_i8(torch.randn(n, k, generator=gen) / k ** 0.5, 0)
    with torch.no_grad():
        mod.wq.copy_(q)
        mod.ws.copy_(s.to(torch.bfloat16))
        if hasattr(mod, "gamma"):
            mod.gamma.copy_((torch.randn(k, generator=gen) * 0.2 + 1.0).to(torch.bfloat16))
    params = {p.name: p for p in mod.function.params}
    scale = torch.logspace(-1, 1, m)[:, None]
    args = [(torch.randn(m, int(params[nm].shape[1]), generator=gen) * scale).to(torch.bfloat16).cuda()
            for nm in mod.input_names]
    tensors = {**dict(zip(mod.input_names, args)), **{p: getattr(mod, a) for p, a in mod._weights.items()}}
    (want,) = lf.evaluate(mod.function, {**tensors, "eps": 1e-5} if "norm" in name else tensors, precision="float64")
    out = torch.full(tuple(want.shape), float("nan"), dtype=torch.bfloat16, device="cuda")
    y = mod(*args, out=(out,))
    torch.cuda.synchronize()
    assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
    err = (out.double() - want).norm() / want.norm()
    assert err < 1e-2, err


QUANT4 = [("u4_linear", 128), ("u4_linear", 64), ("i4_linear", 128), ("i4_linear", 32)]


@pytest.mark.parametrize("m", [1, 5, 16, 40])
@pytest.mark.parametrize("name,group", QUANT4)
def test_4_bit_product_layer_against_float64(name, group, m):
    """The stdlib's 4-bit layers (u4 with zero points, i4 symmetric; scales a group of K): the u4 small-
    token product on the weights repacked from the layer's packed tensors up to 16 rows, the longer-call
    route past them, against the layer's dequantisation in float64, outputs poisoned first; weights
    rewritten in place are repacked (the next call sees them)."""
    from layerforge.dsl.types import pack_4bit
    n, k = 768, 2048
    mod = module(name, dims=lf.stdlib().bindings_for(name, {"I": k, "O": n, "G": group}), dtype="bf16", device="cuda")
    assert mod.kernel_reason is None and mod._linear.wtype == name[:2] and mod._linear.group == group
    gen = seeded_generator("linear-dsl-4bit", name, group, m)

    def fill():
        lo, hi = (0, 16) if name == "u4_linear" else (-8, 8)
        with torch.no_grad():
            mod.wq.copy_(pack_4bit(torch.randint(lo, hi, (n, k), generator=gen)))
            mod.ws.copy_((torch.rand(n, k // group, generator=gen) * 2 / (8 * k ** 0.5)).to(torch.bfloat16))
            if hasattr(mod, "wz"):
                mod.wz.copy_(pack_4bit(torch.randint(0, 16, (n, k // group), generator=gen)))

    for _ in range(2):
        fill()
        x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(torch.bfloat16).cuda()
        tensors = {"x": x, **{p: getattr(mod, a) for p, a in mod._weights.items()}}
        (want,) = lf.evaluate(mod.function, tensors, precision="float64")
        out = torch.full(tuple(want.shape), float("nan"), dtype=torch.bfloat16, device="cuda")
        y = mod(x, out=(out,))
        torch.cuda.synchronize()
        assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
        err = (out.double() - want).norm() / want.norm()
        assert err < 1e-2, err



@pytest.mark.parametrize("m", [1, 7, 16, 40])
def test_group_int8_layer_against_float64(m):
    """int8 weights with scales by group of 128 along K: the i8 small-token product on the module's
    group pairs (made once per weight) up to 16 rows, the longer-call route past them, against the
    layer's dequantisation in float64, outputs poisoned first."""
    n, k = 768, 2048
    mod = module("int8_group_linear", dims=lf.stdlib().bindings_for("int8_group_linear", {"I": k, "O": n, "G": 128}),
                 dtype="bf16", device="cuda")
    assert mod.kernel_reason is None and mod._linear.group == 128
    gen = seeded_generator("linear-dsl-i8-group", m)
    with torch.no_grad():
        mod.wq.copy_(torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8))
        mod.ws.copy_((torch.rand(n, k // 128, generator=gen) / (64 * k ** 0.5)).to(torch.bfloat16))
    x = (torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, m)[:, None]).to(torch.bfloat16).cuda()
    (want,) = lf.evaluate(mod.function, {"x": x, "wq": mod.wq, "ws": mod.ws}, precision="float64")
    out = torch.full(tuple(want.shape), float("nan"), dtype=torch.bfloat16, device="cuda")
    mod(x, out=(out,))
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    err = (out.double() - want).norm() / want.norm()
    assert err < 1e-2, err
