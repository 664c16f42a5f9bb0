"""runtime/quant.py on the CPU: AWQ and GPTQ checkpoints repack into the kernel's layouts
exactly (the kernel layout's dequantisation equals the format's own), round to nearest
quantisation, the torch path of QuantLinear against float64, and input errors."""
import pytest
import torch

from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.quant import (QuantLinear, awq_to_kernel, dequantize, dequantize_awq, dequantize_gptq,
                                      gptq_to_kernel, pack_i8, quantize_i8, quantize_u4)

from ..seeding import seeded_generator
from .quant_formats import awq_tensors, format_dequant, gptq_tensors, random_u4


@pytest.mark.parametrize("group", [32, 64, 128])
def test_awq_repack_round_trip(group):
    gen = seeded_generator("awq-repack", group)
    k, n = 512, 48
    q, z, s = random_u4(k, n, group, gen)
    qweight, qzeros, scales = awq_tensors(q, z, s)
    want = format_dequant(q, z, s, group)
    assert torch.equal(dequantize_awq(qweight, qzeros, scales, group), want)
    qw = awq_to_kernel(qweight, qzeros, scales, group, dtype=torch.float16)   # fp16 scales: exact
    assert (qw.qweight.shape, qw.qweight.dtype, qw.wgroup.shape) == ((n, k // 8), torch.int32, (n, (k // group + 3) // 4 * 4))
    assert torch.equal(dequantize(qw), want)


@pytest.mark.parametrize("zero_offset", [1, 0])
@pytest.mark.parametrize("group", [32, 128])
def test_gptq_repack_round_trip(group, zero_offset):
    """Classic v1 checkpoints store zero - 1 (zero_offset 1), v2 the zero itself; zero 0 stored
    as -1 wraps to 15 in v1 and must come back as 0."""
    gen = seeded_generator("gptq-repack", group, zero_offset)
    k, n = 384, 40
    q, z, s = random_u4(k, n, group, gen)
    z[0, :8] = 0
    tensors = gptq_tensors(q, z, s, group, zero_offset)
    want = format_dequant(q, z, s, group)
    assert torch.equal(dequantize_gptq(*tensors, group, zero_offset), want)
    assert torch.equal(dequantize(gptq_to_kernel(*tensors, group, torch.float16, zero_offset)), want)


@pytest.mark.parametrize("group", [32, 128])
def test_gptq_act_order(group):
    """An act-order checkpoint (g_idx a permutation of the group labels along K) repacks with W's
    columns sorted by group and the order kept (QuantWeight.perm): the layout dequantises to the
    format's own meaning, and a product (the CPU path: gathered x, layout-ordered W) equals
    x W^T; a g_idx that does not give every group `group` columns is an error."""
    gen = seeded_generator("gptq-act-order", group)
    k, n = 512, 48
    q, z, s = random_u4(k, n, group, gen)
    qweight, qzeros, scales, g_idx = gptq_tensors(q, z, s, group)
    g_act = g_idx[torch.randperm(k, generator=gen)]
    want = dequantize_gptq(qweight, qzeros, scales, g_act, group)
    qw = gptq_to_kernel(qweight, qzeros, scales, g_act, group, torch.float16)
    assert qw.perm is not None and torch.equal(g_act[qw.perm], torch.arange(k) // group)
    assert torch.equal(dequantize(qw), want)
    lin = QuantLinear.from_gptq(qweight, qzeros, scales, g_act, group, dtype=torch.float16)
    x = torch.randn(3, k, generator=gen).half()
    got = lin(x).double()
    ref = x.double() @ want.T
    assert ((got - ref).norm() / ref.norm()).item() < 2e-3
    gamma = torch.rand(k, generator=gen).half() + 0.5   # the fused norm's weights follow x's columns
    xn = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * gamma.float()).double()
    got = lin(x, norm=(gamma, 1e-5)).double()
    assert ((got - xn @ want.T).norm() / (xn @ want.T).norm()).item() < 5e-3
    bad = g_idx.clone()
    bad[0] = bad[-1]
    with pytest.raises(ValueError, match="act-order"):
        gptq_to_kernel(qweight, qzeros, scales, bad, group)


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_u4_round_to_nearest(group):
    gen = seeded_generator("rtn-u4", group)
    w = torch.randn(64, 256, generator=gen)
    q, z, s = quantize_u4(w, group)
    assert q.min() >= 0 and q.max() <= 15 and z.min() >= 0 and z.max() <= 15
    deq = (q - z.repeat_interleave(group, 1)) * s.repeat_interleave(group, 1)
    assert (deq - w.double()).abs().max() <= 0.5 * s.max() + 1e-9          # half a step (in range)


def test_i8_layouts():
    gen = seeded_generator("i8")
    w = torch.randn(32, 256, generator=gen)
    for group in (0, 64):
        q, s = quantize_i8(w, group)
        qw = pack_i8(q, s, group, dtype=torch.bfloat16)
        ref = q.double() * (s.double()[:, None] if group == 0 else s.double().repeat_interleave(group, 1))
        s_bf = s.to(torch.bfloat16).double()
        ref_bf = q.double() * (s_bf[:, None] if group == 0 else s_bf.repeat_interleave(group, 1))
        assert torch.equal(dequantize(qw), ref_bf)
        assert (ref - w.double()).abs().max() <= 0.5 * s.max() + 1e-9      # half a step
        # a contiguous view at an odd offset (which .contiguous() returns as it is) is copied: the kernels read
        # W 16 bytes at a time
        buf = torch.zeros(q.numel() + 1, dtype=torch.int8)
        buf[1:] = q.to(torch.int8).reshape(-1)
        odd = pack_i8(buf[1:].view_as(q), s, group, dtype=torch.bfloat16)
        assert odd.qweight.data_ptr() % 16 == 0 and torch.equal(dequantize(odd), ref_bf)


@pytest.mark.parametrize("gated", [None, "silu"])
@pytest.mark.parametrize("wtype,group", [("u4", 32), ("i8", 0), ("i8", 64)])
def test_torch_path_matches_float64(wtype, group, gated):
    gen = seeded_generator("quant-torch", wtype, group, gated)
    lin = QuantLinear.from_float(torch.randn(96, 128, generator=gen), group, torch.randn(96, generator=gen),
                                 wtype=wtype, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 128, generator=gen)
    y = lin(x, gated=gated)
    ref = x.double() @ lin.dequantized().T + lin.bias.double()
    if gated:
        g, u = ref.chunk(2, -1)
        ref = torch.nn.functional.silu(g) * u
    assert y.shape == (2, 3, 48 if gated else 96)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)


def test_input_errors():
    lin = QuantLinear.from_float(torch.randn(64, 128), 64)
    with pytest.raises(LinearInputError, match="last dim 127"):
        lin(torch.randn(2, 127))
    with pytest.raises(LinearInputError, match="residual"):
        lin(torch.randn(2, 128), residual=torch.randn(2, 63))
    with pytest.raises(ValueError, match="group size 128 must divide K = 320"):
        QuantLinear.from_float(torch.randn(64, 320), 128)
    with pytest.raises(ValueError, match="group size must be one of"):
        QuantLinear.from_float(torch.randn(64, 320), 40)
    with pytest.raises(LinearInputError, match="AWQ"):
        QuantLinear.from_awq(torch.zeros(128, 8, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32),
                             torch.zeros(1, 64, dtype=torch.float16), 64)
