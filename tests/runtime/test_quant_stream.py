"""The u4 weight layout of the decode-range GEMM (runtime/quant.pack_stream_u4; codegen/gemm_stream.py
wtype "u4"): read back the way the kernel's consumer threads read it (lane (g, tig) of warp w4 of a
row block, a 16-byte piece an atom, lf_dequant's nibble pairs, the unit's (scale, zero) words), it
gives every element of W as dequantize defines it; rows and k past W are zeros. CPU only."""
import pytest
import torch

from layerforge.codegen.gemm_stream import plan_gemm_stream
from layerforge.runtime.quant import dequantize, pack_stream_u4, pack_u4, quantize_u4


def kernel_view(packed: torch.Tensor, plan) -> torch.Tensor:
    """W [tiles * BW, KT * 256] in float64 as the kernel's threads see it (tile rows in the tile's order)."""
    bw, kt, gpu = plan.bw, plan.kt, 256 // plan.group
    unit = packed.view(plan.tiles * kt, bw * 32 + bw * gpu).to(torch.int64) & 0xFFFFFFFF
    words, pairs = unit[:, : bw * 32], unit[:, bw * 32:].reshape(-1, bw, gpu)
    out = torch.zeros(plan.tiles * bw, kt * 256, dtype=torch.float64)
    scale = pairs & 0xFFFF
    zero = pairs >> 16

    def to_f(half):   # a bf16's 16 bits -> its value
        return (half.to(torch.int32) << 16).view(torch.float32).double()

    for u in range(plan.tiles * kt):
        tile, k0 = divmod(u, kt)
        for rbx in range(bw // 64):
            for c in range(4):
                for w4 in range(4):
                    for lane in range(32):
                        g, tig = divmod(lane, 4)
                        base = (((rbx * 4 + c) * 4 + w4) * 32 + lane) * 4
                        for word in range(4):
                            sp, h = divmod(word, 2)
                            r = rbx * 64 + 16 * w4 + g + 8 * h
                            j = (c * 64 + sp * 32) // plan.group
                            s, z = to_f(scale[u, r, j]), to_f(zero[u, r, j])
                            wv = int(words[u, base + word])
                            for i in range(4):            # pair i: step 2 sp + i // 2, k + 8 (i odd)
                                for e in range(2):        # low / high half: k, k + 1
                                    q = (wv >> (4 * i + 16 * e)) & 0xF
                                    kk = k0 * 256 + c * 64 + sp * 32 + (i // 2) * 16 + (i % 2) * 8 + 2 * tig + e
                                    out[tile * bw + r, kk] = (q - z) * s
    return out


def tile_row(row: int, n: int, bw: int, gated) -> int:
    """The row of the packers' tile order that holds W's row `row` (gated: a tile's BW / 2 gate rows,
    then the same up rows)."""
    if not gated:
        return row
    tile, r = divmod(row % (n // 2), bw // 2)
    return tile * bw + r + (bw // 2 if row >= n // 2 else 0)


@pytest.mark.parametrize("n,k,group,gated", [(130, 384, 128, None), (2 * 70, 256, 64, "silu"), (64, 512, 32, None)])
def test_pack_stream_u4_reads_back_as_the_reference(n, k, group, gated):
    gen = torch.Generator().manual_seed(n + k + group)
    w = torch.randn(n, k, generator=gen)
    q, z, s = quantize_u4(w, group)
    qw = pack_u4(q, z, s, group, torch.bfloat16)
    plan = plan_gemm_stream("bf16", n=n, k=k, mt=16, gated=gated, wtype="u4", group=group)
    got = kernel_view(pack_stream_u4(qw, plan), plan)
    ref = dequantize(qw)
    placed = [tile_row(row, n, plan.bw, gated) for row in range(n)]
    for row, at in enumerate(placed):
        assert torch.equal(got[at, :k], ref[row]), row
        assert not got[at, k:].any()
    for at in set(range(plan.tiles * plan.bw)) - set(placed):
        assert not got[at].any()


def test_pack_stream_u4_checks_its_plan():
    q, z, s = quantize_u4(torch.randn(64, 256), 128)
    qw = pack_u4(q, z, s, 128)
    with pytest.raises(ValueError, match="pack_stream_u4"):
        pack_stream_u4(qw, plan_gemm_stream("bf16", n=64, k=256, mt=16, wtype="u4", group=64))


def test_stream_pack_cache_follows_in_place_writes():
    """The packed copy is made once a weight and plan, and again after the weight's tensors are
    written in place (load_state_dict copies into the same buffers)."""
    from layerforge.runtime.quant import QuantLinear, stream_packed
    lin = QuantLinear.from_float(torch.randn(64, 256), 128, wtype="u4")
    plan = plan_gemm_stream("bf16", n=64, k=256, mt=64, wtype="u4", group=128)
    first = stream_packed(lin.qw, plan)
    assert stream_packed(lin.qw, plan) is first
    other = QuantLinear.from_float(torch.randn(64, 256), 128, wtype="u4")
    lin.load_state_dict(other.state_dict())
    again = stream_packed(lin.qw, plan)
    assert again is not first and torch.equal(again, pack_stream_u4(other.qw, plan))


def i8_kernel_view(packed: torch.Tensor, plan) -> torch.Tensor:
    """q [tiles * BW, KT * 256] as the i8 kernel's threads read it (before the row scale)."""
    bw, kt = plan.bw, plan.kt
    b = packed.view(plan.tiles * kt, bw // 64, 4, 4, 2, 32, 4, 4).to(torch.int64)   # unit, rbx, at, w4, h, lane, word, byte
    out = torch.zeros(plan.tiles * bw, kt * 256, dtype=torch.int64)
    for u in range(plan.tiles * kt):
        tile, k0 = divmod(u, kt)
        for rbx in range(bw // 64):
            for at in range(4):
                for w4 in range(4):
                    for h in range(2):
                        for lane in range(32):
                            g, tig = divmod(lane, 4)
                            for word in range(4):
                                e, hrow = divmod(word, 2)
                                r = rbx * 64 + 16 * w4 + g + 8 * hrow
                                for byte in range(4):   # lf_dequant: pairs (byte 0, 1) = a0 / a1, (2, 3) = a2 / a3
                                    kh, bb = divmod(byte, 2)
                                    kk = k0 * 256 + at * 64 + (2 * h + e) * 16 + kh * 8 + 2 * tig + bb
                                    out[tile * bw + r, kk] = b[u, rbx, at, w4, h, lane, word, byte]
    return out


@pytest.mark.parametrize("n,k,gated", [(130, 384, None), (2 * 70, 256, "silu")])
def test_pack_stream_i8_reads_back_as_q(n, k, gated):
    from layerforge.runtime.quant import pack_i8, pack_stream_i8, quantize_i8
    q, s = quantize_i8(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), 0)
    qw = pack_i8(q, s, 0)
    plan = plan_gemm_stream("bf16", n=n, k=k, mt=16, gated=gated, wtype="i8")
    got = i8_kernel_view(pack_stream_i8(qw, plan), plan)
    for row in range(n):
        at = tile_row(row, n, plan.bw, gated)
        assert torch.equal(got[at, :k], qw.qweight[row].to(torch.int64)), row
        assert not got[at, k:].any()
    assert int(got.abs().sum()) == int(qw.qweight.to(torch.int64).abs().sum())   # nothing else placed


def test_stream_wtypes_refuses_unknown_entries(monkeypatch):
    from layerforge.runtime import quant
    q, z, s = quantize_u4(torch.randn(64, 256), 128)
    qw = pack_u4(q, z, s, 128)
    monkeypatch.setattr(quant, "STREAM_WTYPES", ("u4", "f8"))
    with pytest.raises(ValueError, match="STREAM_WTYPES"):
        quant._stream_ok(torch.randn(64, 256), qw, 64, None)
