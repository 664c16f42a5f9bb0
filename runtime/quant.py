"""Quantised Linear layers for decode: weight-only 4-bit (AWQ / GPTQ checkpoints, or round to
nearest) and 8-bit weights, and fp8 W8A8 (e4m3 weights and activations), read by the small-token
product kernel (codegen/gemv.py) as packed.

    lin = QuantLinear.from_awq(qweight, qzeros, scales, group_size=128, dtype=torch.float16)
    lin = QuantLinear.from_gptq(qweight, qzeros, scales, g_idx, group_size=128)
    lin = QuantLinear.from_float(weight, group_size=128)            # u4, round to nearest, per group
    lin = QuantLinear.from_float(weight, wtype="i8")                # i8, one scale a row
    lin = QuantLinear.from_fp8(weight, weight_scale)                # fp8 checkpoint, per tensor / channel
    lin = QuantLinear.from_fp8(weight, weight_scale_inv, block=128) # DeepSeek-V3's 128 x 128 blocks
    lin = QuantLinear.from_float(weight, 0, wtype="f8e4m3")         # e4m3, one scale a row (128: blocks)
    y = lin(x, gated="silu", residual=r, norm=(gamma, eps))         # Linear's fused epilogues

Checkpoint formats (what the repack functions read; W is the [N, K] = [out, in] weight):
  AWQ ("GEMM" version, autoawq / transformers): qweight int32 [K, N / 8], packed along N: the
    8 nibbles of a word, from bit 0, are columns 8j + (0, 2, 4, 6, 1, 3, 5, 7); qzeros int32
    [K / G, N / 8] in the same order; scales fp16 [K / G, N]; W[n, k] = (q - z) * s of group k // G.
  GPTQ (auto-gptq / optimum, classic "v1" checkpoints): qweight int32 [K / 8, N], packed along K
    (nibble j of word i is k = 8 i + j); qzeros int32 [K / G, N / 8] packed along N in plain
    order, holding zero - 1 (the packer subtracts 1, the dequantiser adds it back; `zero_offset=0`
    reads "v2" checkpoints that store the zero itself); scales [K / G, N]; g_idx [K] the group of
    each k. A symmetric checkpoint (sym=True) is the same format with every zero 8 (stored 7).
    Act-order checkpoints (desc_act: g_idx not k // G) are refused: the kernel's groups are
    contiguous runs of K, and reordering W's columns would make the caller permute x.
  FP8 (compressed-tensors / HF "fp8", DeepSeek-V3): weight float8_e4m3fn [N, K], W = q * s with
    weight_scale f32 [] / [1] (per tensor) or [N, 1] (per channel), or weight_scale_inv f32
    [ceil(N / 128), ceil(K / 128)], one per 128 x 128 block (despite its name a multiplier too).
    The activations are quantised on the fly: W8A8 (below).
The kernel's layouts (the codegen/gemv.py docstring) are repacked from these once, at load.
W8A8 numerics (quantize_fp8_rows; the kernel computes the same q): each token's x (after the
RMSNorm's gamma, when fused; rstd factors out) in groups of 128 k, amax the largest |x| of the
group, scale = amax * f32(1 / 448), q = e4m3(x * (448 / amax)) with the f32 product rounded once
to nearest even (q = 0 where amax = 0); y = sum over groups of scale * sum_k q_x q_w * W's scale.
Prefill-sized calls (FP8_GEMM_MIN_ROWS rows and more, a row-scaled W, no norm prologue, sm_90) take
one group a token instead (amax over the whole row, the same rounding: quantize_fp8_rows(x, K)),
the scaling the Hopper FP8 GEMM applies in its epilogue (fp8_gemm; per-token activations with
per-channel weights, as vLLM's dynamic W8A8); decode keeps the finer 128-k groups.
Scales and zeros are kept in the activation dtype: a zero is a whole number, exact in bf16/f16,
and the kernel computes (q - z) * s with the multiply the only rounding (scales cast from the
checkpoint's fp16 to bf16 round once, at load, as any bf16 deployment of fp16 scales does).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

import torch.nn.functional as F

from ..codegen.gemv import FP8_MIN_ARCH, GROUPS
from .linear import (_ACT, LinearInputError, _capability, _epilogue, _packed, _reference, check_call, device_major,
                     launch_gemv)
from .tma import tensor_map

__all__ = ["QuantWeight", "QuantLinear", "shard_quant", "AWQ_ORDER", "pack_u4", "pack_i8", "pack_fp8", "quantize_u4",
           "quantize_i8", "quantize_fp8", "quantize_fp8_rows", "dequantize_fp8_rows", "awq_to_kernel",
           "gptq_to_kernel", "dequantize", "dequantize_awq", "dequantize_gptq", "unpack_awq", "unpack_gptq",
           "gemv_quant", "dequantize_cuda", "quantize_fp8_rows_cuda", "FP8_MAX", "FP8_BLOCK", "QUANT_KERNEL_MAX_ROWS",
           "pack_stream_u4", "pack_stream_i8", "STREAM_QUANT_ROWS", "STREAM_WTYPES", "fp8_gemm", "FP8_GEMM_MIN_ROWS", "FP8_GEMM_SCALES",
           "fp8_activation_group", "fp8_linear_per_token"]

FP8_MAX = 448.0    # the largest finite e4m3 (float8_e4m3fn)
FP8_BLOCK = 128    # k per activation scale (the kernel's chunk) and the side of a weight scale block
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # the element at nibble i of a word, AWQ's and the kernel's u4
_SHIFTS = torch.arange(0, 32, 4)


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 8]: nibble i (bits 4i) of each word, as int64."""
    return (words.to(torch.int64)[..., None] >> _SHIFTS.to(words.device)) & 0xF


def _words(nib: torch.Tensor) -> torch.Tensor:
    """[..., W, 8] nibbles (nibble i to bits 4i) -> int32 [..., W] (bit 31 wraps to the sign)."""
    v = (nib.to(torch.int64) << _SHIFTS.to(nib.device)).sum(-1)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


_INV_AWQ = [AWQ_ORDER.index(i) for i in range(8)]   # the nibble that holds element i


# ---- checkpoint formats -> integer q [N, K], zeros [N, K / G], scales [N, K / G] ----------------
def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """AWQ GEMM tensors -> (q int64 [N, K], z int64 [N, K / G], s [N, K / G])."""
    k, n8 = qweight.shape
    if qzeros.shape != (k // group_size, n8) or scales.shape != (k // group_size, 8 * n8) or k % group_size:
        raise LinearInputError(f"AWQ: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                               f"{tuple(scales.shape)} do not fit [K, N/8], [K/G, N/8], [K/G, N] with G = {group_size}")
    q = _nibbles(qweight)[..., _INV_AWQ].reshape(k, 8 * n8)
    z = _nibbles(qzeros)[..., _INV_AWQ].reshape(k // group_size, 8 * n8)
    return q.T.contiguous(), z.T.contiguous(), scales.T.contiguous()


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                group_size: int, zero_offset: int = 1):
    """GPTQ tensors -> (q int64 [N, K], z int64 [N, groups], s [N, groups], g_idx [K])."""
    k8, n = qweight.shape
    k = 8 * k8
    groups = scales.shape[0]
    if qzeros.shape != (groups, n // 8) or scales.shape != (groups, n) or n % 8:
        raise LinearInputError(f"GPTQ: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                               f"{tuple(scales.shape)} do not fit [K/8, N], [groups, N/8], [groups, N]")
    q = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)          # k = 8 i + j
    z = (_nibbles(qzeros).reshape(groups, n) + zero_offset) & 0xF if zero_offset else _nibbles(qzeros).reshape(groups, n)
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // group_size
    return q.T.contiguous(), z.T.contiguous(), scales.T.contiguous(), g_idx.to(torch.int64)


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The AWQ checkpoint's W [N, K] in float64: (q - z) * s (the format's own meaning)."""
    q, z, s = unpack_awq(qweight, qzeros, scales, group_size)
    return ((q - z.repeat_interleave(group_size, 1)) * s.double().repeat_interleave(group_size, 1))


def dequantize_gptq(qweight, qzeros, scales, g_idx, group_size: int, zero_offset: int = 1) -> torch.Tensor:
    """The GPTQ checkpoint's W [N, K] in float64: (q[k] - z[g_idx[k]]) * s[g_idx[k]], any g_idx."""
    q, z, s, g = unpack_gptq(qweight, qzeros, scales, g_idx, group_size, zero_offset)
    return (q - z[:, g]) * s.double()[:, g]


# ---- the kernel's layouts ------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantWeight:
    """W [N, K] in a layout of the quantised gemv kernel (codegen/gemv.py's docstring)."""
    wtype: str                     # "u4" | "i8" | "f8e4m3"
    group: int                     # k per (scale, zero) pair; 0: one scale a row (i8, f8e4m3); f8e4m3 128: blocks
    qweight: torch.Tensor          # u4: int32 [N, K / 8] (AWQ's nibble order along K); i8: int8 [N, K];
                                   # f8e4m3: float8_e4m3fn [N, K]
    wgroup: torch.Tensor | None    # int32 [N, GPAD]: the dtype pair (scale, zero) of each group, zero padded
    wscale: torch.Tensor | None    # dtype [N]: i8's row scales (group 0); f8e4m3: f32 [N] or
                                   # [ceil(N / 128), ceil(K / 128)] (group 128)
    n: int
    k: int
    dtype: torch.dtype             # the activation dtype: x, the pairs' halves, wscale, y
    perm: torch.Tensor | None = None   # int64 [K] (GPTQ act-order): the layout's column j is W's column
                                       # perm[j], so products take x[..., perm] (and gamma[perm])

    def __post_init__(self):
        # the kernels read W and its pairs in 16-byte pieces, f8e4m3's row scales two at a time
        rows8 = self.wtype == "f8e4m3" and not self.group
        for name, align in (("qweight", 16), ("wgroup", 16), ("wscale", 8 if rows8 else 1)):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor) and t.is_cuda and t.data_ptr() % align:
                raise ValueError(f"QuantWeight: {name} must start at a {align}-byte aligned address (the kernels "
                                 f"read it {align} bytes at a time); this view starts {t.data_ptr() % align} bytes "
                                 f"past one (pack_u4 / pack_i8 / pack_fp8 copy such views)")

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def kernel_tensors(self) -> list[torch.Tensor]:
        """W's arguments of the kernel, in its ABI's order."""
        return [self.qweight, self.wgroup if self.group and self.wtype != "f8e4m3" else self.wscale]

    def scales_zeros(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs as (scales, zeros), each [N, K / G] in the activation dtype."""
        pairs = self.wgroup[:, : self.k // self.group].contiguous().view(self.dtype).view(self.n, -1, 2)
        return pairs[..., 0], pairs[..., 1]

    def nbytes(self) -> int:
        """Bytes the kernel reads for W (packed weight and its scales)."""
        return sum(t.numel() * t.element_size() for t in self.kernel_tensors)


def _pairs(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales, zeros [N, G] -> int32 [N, GPAD]: (scale, zero) in dtype, scale in the low half."""
    n, g = scales.shape
    pad = (g + 3) // 4 * 4
    both = torch.zeros(n, pad, 2, dtype=dtype, device=scales.device)
    both[:, :g, 0] = scales.to(dtype)
    both[:, :g, 1] = zeros.to(dtype)
    return both.view(torch.int32).view(n, pad)


def _check_group(wtype: str, group: int, k: int) -> None:
    if group not in GROUPS[wtype]:
        raise ValueError(f"{wtype}: group size must be one of {GROUPS[wtype]}, got {group!r}")
    if group and k % group:
        raise ValueError(f"{wtype}: the group size {group} must divide K = {k}")


def pack_u4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int,
            dtype: torch.dtype = torch.bfloat16) -> QuantWeight:
    """q [N, K] in 0..15, zeros [N, K / G] in 0..15, scales [N, K / G] -> the kernel's u4 layout."""
    n, k = q.shape
    _check_group("u4", group, k)
    if zeros.shape != (n, k // group) or scales.shape != (n, k // group):
        raise ValueError(f"u4: zeros and scales must be [{n}, {k // group}], got {tuple(zeros.shape)}, "
                         f"{tuple(scales.shape)}")
    qweight = _words(q.reshape(n, k // 8, 8)[..., list(AWQ_ORDER)])
    return QuantWeight("u4", group, qweight.contiguous(), _pairs(scales, zeros, dtype), None, n, k, dtype)


def pack_i8(q: torch.Tensor, scales: torch.Tensor, group: int = 0, dtype: torch.dtype = torch.bfloat16) -> QuantWeight:
    """q int8 [N, K] and scales [N] (group 0) or [N, K / G] -> the kernel's i8 layout."""
    n, k = q.shape
    _check_group("i8", group, k)
    if k % 16:
        raise ValueError(f"i8: K = {k} must be a multiple of 16 (rows of 16-byte pieces)")
    q8 = _packed(q.to(torch.int8), 16)   # (a contiguous view at an odd offset: copied, the kernels read 16 bytes)
    if group == 0:
        if scales.shape != (n,):
            raise ValueError(f"i8: row scales must be [{n}], got {tuple(scales.shape)}")
        return QuantWeight("i8", 0, q8, None, _packed(scales.to(dtype), 16), n, k, dtype)
    if scales.shape != (n, k // group):
        raise ValueError(f"i8: scales must be [{n}, {k // group}], got {tuple(scales.shape)}")
    return QuantWeight("i8", group, q8, _pairs(scales, torch.zeros_like(scales), dtype), None, n, k, dtype)


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """W [N, K] in float64 from the kernel's layout, in W's own column order: the reference the
    kernel is tested against."""
    w = _dequantize_layout(qw)
    return w if qw.perm is None else w[:, torch.argsort(qw.perm)]


def _dequantize_layout(qw: QuantWeight) -> torch.Tensor:
    """W [N, K] in float64 in the layout's column order (act-order: W[:, perm])."""
    if qw.wtype == "u4":
        q = _nibbles(qw.qweight)[..., _INV_AWQ].reshape(qw.n, qw.k)
        s, z = (t.double().repeat_interleave(qw.group, 1) for t in qw.scales_zeros())
        return (q - z) * s
    q = qw.qweight.double()
    if qw.wtype == "f8e4m3" and qw.group:
        return q * _blocks(qw.wscale.double(), qw.n, qw.k)
    if qw.group == 0:
        return q * qw.wscale.double()[:, None]
    return q * qw.scales_zeros()[0].double().repeat_interleave(qw.group, 1)


def shard_quant(qw: QuantWeight, dim: int, ranges) -> QuantWeight:
    """The part of W [N, K] a tensor-parallel rank holds, in the same layout: rows (dim 0: its heads' q/k/v, its
    features' gate/up; several ranges, concatenated in order) or columns (dim 1: o's and down's K, one range). Rows
    split anywhere but FP8's 128 x 128 block scales, which split only in whole blocks; columns split only at whole
    groups (u4: whole 8-column words too; FP8 blocks: whole blocks), and not where GPTQ's act-order sorted W's
    columns by group (a rank's columns are then in every group). A ValueError says which."""
    ranges = list(ranges)
    block = qw.wtype == "f8e4m3" and qw.group
    if dim == 0:
        rows = torch.cat([torch.arange(r.start, r.stop) for r in ranges]).to(qw.qweight.device)
        if block:
            if any(r.start % qw.group or (r.stop % qw.group and r.stop != qw.n) for r in ranges):
                raise ValueError(f"{qw.wtype}: rows {[(r.start, r.stop) for r in ranges]} of {qw.n} do not split at "
                                 f"whole {qw.group} x {qw.group} scale blocks")
            wscale = torch.cat([qw.wscale[r.start // qw.group: -(-r.stop // qw.group)] for r in ranges])
        else:
            wscale = None if qw.wscale is None else qw.wscale[rows]
        wgroup = None if qw.wgroup is None else qw.wgroup[rows]
        return dataclasses.replace(qw, qweight=qw.qweight[rows].contiguous(), n=len(rows),
                                   wgroup=None if wgroup is None else wgroup.contiguous(),
                                   wscale=None if wscale is None else wscale.contiguous())
    if dim != 1 or len(ranges) != 1:
        raise ValueError(f"{qw.wtype}: a quantised weight splits along its rows (several ranges) or its columns "
                         f"(one range), not dim {dim} in {len(ranges)} ranges")
    (r,) = ranges
    if qw.perm is not None:
        raise ValueError("GPTQ act-order (desc_act): W's columns are stored sorted by group, so a rank's columns "
                         "[%d, %d) lie in every group; such a checkpoint does not split along K" % (r.start, r.stop))
    unit = qw.group or 16   # (u4 is always grouped; i8 / f8 rows are read in 16-byte pieces)
    if r.start % unit or r.stop % unit:
        raise ValueError(f"{qw.wtype}: columns [{r.start}, {r.stop}) of {qw.k} do not split at whole "
                         f"{'groups of ' + str(qw.group) if qw.group else '16-byte pieces'} ({unit} columns)")
    k = len(r)
    if qw.wtype == "u4":
        qweight = qw.qweight[:, r.start // 8: r.stop // 8]
    else:
        qweight = qw.qweight[:, r.start: r.stop]
    wgroup, wscale = qw.wgroup, qw.wscale
    if block:
        wscale = wscale[:, r.start // qw.group: -(-r.stop // qw.group)]
    elif qw.group:   # the (scale, zero) pairs of the rank's groups, padded to whole 16-byte pieces again
        g0, g = r.start // qw.group, k // qw.group
        wgroup = torch.zeros(qw.n, (g + 3) // 4 * 4, dtype=torch.int32, device=qw.wgroup.device)
        wgroup[:, :g] = qw.wgroup[:, g0: g0 + g]
    return dataclasses.replace(qw, qweight=_packed(qweight.contiguous(), 16), k=k, wgroup=wgroup,
                               wscale=None if wscale is None else wscale.contiguous())


def _tile_rows(t: torch.Tensor, plan, width: int) -> torch.Tensor:
    """t [N, C] (int64) as the plan's tiles order their rows, [tiles x BW, width]: gated tiles BW / 2
    gate rows then the same up rows; rows past N and columns past C zero."""
    tiles, bw = plan.tiles, plan.bw
    rows = torch.arange(tiles * bw, device=t.device).view(tiles, bw)
    if plan.gated:   # tile t: gate rows t BWO .. , then up rows NOUT + t BWO ..
        half, nout = bw // 2, plan.n_out
        col = (rows % bw) % half + rows // bw * half
        src = torch.where(rows % bw < half, col, nout + col)
        ok = col < nout
    else:
        src, ok = rows, rows < plan.n
    src = torch.where(ok, src, 0).view(-1)
    out = torch.zeros(tiles * bw, width, dtype=torch.int64, device=t.device)
    out[:, : t.shape[1]] = t[src] * ok.view(-1, 1)
    return out


def pack_stream_i8(qw: QuantWeight, plan) -> torch.Tensor:
    """An i8 W (one scale a row) in the decode-range GEMM's layout (codegen/gemm_stream.py, wtype
    "i8"): int8, unit (tile, 256 k) after unit, each [row block][atom of 64 k][warp][half][lane][4
    words], half h holding k16 steps 2 h and 2 h + 1; word 2 e (+ 1) is row 16 warp + g (+ 8) of step
    2 h + e, its bytes k 2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9 (lf_dequant's pairs: the A fragment's
    a0 / a2, a1 / a3). Tiles as pack_stream_u4's; the row scales stay qw.wscale (the epilogue's)."""
    if qw.wtype != "i8" or plan.wtype != "i8" or qw.group or (qw.n, qw.k) != (plan.n, plan.k):
        raise ValueError(f"pack_stream_i8: an i8 weight with row scales and [{plan.n}, {plan.k}] for {plan.key}, "
                         f"got {qw.wtype} group {qw.group} [{qw.n}, {qw.k}]")
    tiles, bw, kt = plan.tiles, plan.bw, plan.kt
    qt = _tile_rows(qw.qweight.to(torch.int64), plan, kt * 256)
    # rows (rbx, w4, hrow, g); k (kt, at, half, e, kh, tig, b) -> [tile, kt, rbx, at, w4, half, g, tig, e, hrow, kh, b]
    v = qt.view(tiles, bw // 64, 4, 2, 8, kt, 4, 2, 2, 2, 4, 2).permute(0, 5, 1, 6, 2, 7, 4, 10, 8, 3, 9, 11)
    return v.to(torch.int8).contiguous().view(-1)


def pack_stream_u4(qw: QuantWeight, plan) -> torch.Tensor:
    """A u4 W in the decode-range GEMM's layout (codegen/gemm_stream.py, wtype "u4"): int32, unit
    (tile, 256 k) after unit, each [nibbles: BW x 128 bytes][pairs: BW x 256 / G int32]. The nibbles
    are ordered as the consumer threads read them: [row block][atom of 64 k][warp][lane][4 words],
    lane (g, tig)'s words holding rows 16 warp + g and + 8 of k16 steps (0, 1) then (2, 3) of the
    atom, each word 8 k of one row as lf_dequant takes them: pair i (bits 4 i and 16 + 4 i) is k
    2 tig, 2 tig + 1 (i even) or those + 8 (i odd) of step 2 (word's pair) + i // 2; the pairs are
    the layout's (scale, zero) words [row][group of the unit]. Gated tiles are BW / 2 gate rows then
    the same up rows; rows past N and k past K are zeros (so are their pairs)."""
    if qw.wtype != "u4" or plan.wtype != "u4" or qw.group != plan.group or (qw.n, qw.k) != (plan.n, plan.k):
        raise ValueError(f"pack_stream_u4: a u4 weight of group {plan.group} and [{plan.n}, {plan.k}] for "
                         f"{plan.key}, got {qw.wtype} group {qw.group} [{qw.n}, {qw.k}]")
    n, k, g = qw.n, qw.k, qw.group
    tiles, bw, kt, gpu = plan.tiles, plan.bw, plan.kt, 256 // g
    dev = qw.qweight.device
    q = _nibbles(qw.qweight)[..., _INV_AWQ].reshape(n, k)                       # int64 [N, K]
    pairs = qw.wgroup[:, : k // g].to(torch.int64) & 0xFFFFFFFF                # [N, K / G]
    qt = _tile_rows(q, plan, kt * 256)
    pt = _tile_rows(pairs, plan, kt * gpu)
    # rows (rbx, w4, h, g); k (kt, c, sp, s, half, tig, e) -> [tile, kt, rbx, c, w4, g, tig, sp, h | s, half, e]
    v = qt.view(tiles, bw // 64, 4, 2, 8, kt, 4, 2, 2, 2, 4, 2).permute(0, 5, 1, 6, 2, 4, 10, 7, 3, 8, 9, 11)
    shift = (4 * (2 * torch.arange(2, device=dev).view(2, 1, 1) + torch.arange(2, device=dev).view(1, 2, 1))
             + 16 * torch.arange(2, device=dev).view(1, 1, 2))                   # [s, half, e] -> bit
    words = (v << shift).sum((-3, -2, -1)).reshape(tiles * kt, bw * 32)         # [unit, BW x 32 words]
    ptu = pt.view(tiles, bw, kt, gpu).permute(0, 2, 1, 3).reshape(tiles * kt, bw * gpu)
    both = torch.cat([words, ptu], 1)
    return torch.where(both >= 2 ** 31, both - 2 ** 32, both).to(torch.int32).contiguous().view(-1)


def quantize_u4(weight: torch.Tensor, group: int):
    """Round to nearest, asymmetric, per group of `group` k: (q, zeros, scales) with
    W ~ (q - z) * s, q and z in 0..15."""
    n, k = weight.shape
    _check_group("u4", group, k)
    w = weight.double().reshape(n, k // group, group)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-12)
    z = (-lo / s).round().clamp(0, 15)
    q = (w / s[..., None] + z[..., None]).round().clamp(0, 15)
    return q.reshape(n, k).to(torch.int64), z.to(torch.int64), s


def quantize_i8(weight: torch.Tensor, group: int = 0):
    """Round to nearest, symmetric: (q int8, scales [N] or [N, K / G]) with W ~ q * s."""
    n, k = weight.shape
    _check_group("i8", group, k)
    w = weight.double().reshape(n, 1 if group == 0 else k // group, -1)
    s = (w.abs().amax(-1) / 127).clamp(min=1e-12)
    q = (w / s[..., None]).round().clamp(-127, 127).reshape(n, k).to(torch.int8)
    return q, s[:, 0] if group == 0 else s


def awq_to_kernel(qweight, qzeros, scales, group_size: int, dtype: torch.dtype = torch.float16) -> QuantWeight:
    """Repack an AWQ (GEMM) checkpoint's tensors into the kernel's u4 layout."""
    q, z, s = unpack_awq(qweight, qzeros, scales, group_size)
    return pack_u4(q, z, s, group_size, dtype)


def gptq_to_kernel(qweight, qzeros, scales, g_idx, group_size: int, dtype: torch.dtype = torch.float16,
                   zero_offset: int = 1) -> QuantWeight:
    """Repack a GPTQ checkpoint's 4-bit tensors into the kernel's u4 layout. Act-order checkpoints
    (desc_act: g_idx a permutation of the groups along K) are repacked with W's columns sorted by
    group (stable), so each group is again a contiguous run of `group_size` k, and the layout
    records the order (QuantWeight.perm): a product gathers x's columns the same way first."""
    q, z, s, g = unpack_gptq(qweight, qzeros, scales, g_idx, group_size, zero_offset)
    k = q.shape[1]
    groups = k // group_size
    g = g.cpu()
    if z.shape[1] != groups or g.shape != (k,):
        raise LinearInputError(f"GPTQ: g_idx of shape {tuple(g.shape)} and {z.shape[1]} groups do not fit K = {k} "
                               f"in groups of {group_size}")
    if torch.equal(g, torch.arange(k) // group_size):
        return pack_u4(q, z, s, group_size, dtype)
    if g.min() < 0 or g.max() >= groups or not torch.equal(torch.bincount(g, minlength=groups),
                                                            torch.full((groups,), group_size)):
        raise LinearInputError(f"GPTQ act-order: g_idx must give each of the {groups} groups {group_size} columns")
    perm = torch.argsort(g, stable=True)
    qw = pack_u4(q[:, perm.to(q.device)], z, s, group_size, dtype)
    return dataclasses.replace(qw, perm=perm.to(qw.qweight.device))


# ---- fp8 (e4m3) ---------------------------------------------------------------------------------
def _e4m3(v: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """v / (amax / 448) as the kernel rounds it: v * (448 / amax) in f32, once to e4m3 (0 where amax = 0)."""
    inv = torch.where(amax > 0, torch.full_like(amax, FP8_MAX) / amax, torch.zeros_like(amax))
    return (v * inv).to(torch.float8_e4m3fn)


def _blocks(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[ceil(N / 128), ceil(K / 128)] block scales -> [N, K]."""
    return scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]


def quantize_fp8_rows(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The W8A8 kernel's activation quantisation (the module's docstring): x [..., K] ->
    (q float8_e4m3fn [..., K], scale f32 [..., ceil(K / group)]), x ~ q * scale per group of k."""
    k = x.shape[-1]
    groups = -(-k // group)
    xg = F.pad(x.float(), (0, groups * group - k)).reshape(*x.shape[:-1], groups, group)
    amax = xg.abs().amax(-1)
    q = _e4m3(xg, amax[..., None]).reshape(*x.shape[:-1], groups * group)[..., :k]
    return q, amax * (1.0 / FP8_MAX)


def dequantize_fp8_rows(q: torch.Tensor, scale: torch.Tensor, group: int = FP8_BLOCK) -> torch.Tensor:
    """quantize_fp8_rows's x in float64: q * scale of its group."""
    return q.double() * scale.double().repeat_interleave(group, -1)[..., : q.shape[-1]]


def quantize_fp8(weight: torch.Tensor, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A float W [N, K] -> (q float8_e4m3fn [N, K], f32 scales): one a row (block None) or one per
    128 x 128 block (block 128, [ceil(N / 128), ceil(K / 128)]); scale = amax / 448."""
    n, k = weight.shape
    w = weight.float()
    if block is None:
        amax = w.abs().amax(1)
        return _e4m3(w, amax[:, None]), amax * (1.0 / FP8_MAX)
    _check_block(block)
    nb, kb = -(-n // block), -(-k // block)
    wb = F.pad(w, (0, kb * block - k, 0, nb * block - n)).reshape(nb, block, kb, block)
    amax = wb.abs().amax((1, 3))
    q = _e4m3(wb, amax[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k]
    return q.contiguous(), amax * (1.0 / FP8_MAX)


def _check_block(block) -> int:
    """128, (128, 128) or [128, 128] (a checkpoint's weight_block_size) -> 128."""
    b = tuple(block) if isinstance(block, (tuple, list)) else (block, block)
    if b != (FP8_BLOCK, FP8_BLOCK):
        raise ValueError(f"f8e4m3: weight scale blocks must be {FP8_BLOCK} x {FP8_BLOCK}, got {block!r}")
    return FP8_BLOCK


def pack_fp8(q: torch.Tensor, scale: torch.Tensor, block=None, dtype: torch.dtype = torch.bfloat16) -> QuantWeight:
    """q float8_e4m3fn [N, K] and its f32 scales -> the kernel's f8e4m3 layout: scale [] or [1]
    (per tensor, repeated a row), [N] or [N, 1] (per channel), or with block 128 the block scales
    [ceil(N / 128), ceil(K / 128)]. `dtype` is the activations' (x, bias, y)."""
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise ValueError(f"f8e4m3: the weight must be float8_e4m3fn [N, K], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    if k % 16:
        raise ValueError(f"f8e4m3: K = {k} must be a multiple of 16 (rows of 16-byte pieces)")
    if block is not None:
        _check_block(block)
        if k % FP8_BLOCK:
            raise ValueError(f"f8e4m3: with block scales K = {k} must be a multiple of {FP8_BLOCK}")
        want = (-(-n // FP8_BLOCK), k // FP8_BLOCK)
        if tuple(scale.shape) != want:
            raise ValueError(f"f8e4m3: block scales must be {list(want)}, got {list(scale.shape)}")
        return QuantWeight("f8e4m3", FP8_BLOCK, _packed(q, 16), None, _packed(scale.float(), 16), n, k, dtype)
    if scale.numel() == 1:
        rows = scale.float().reshape(1).expand(n)
    elif tuple(scale.shape) in ((n,), (n, 1)):
        rows = scale.float().reshape(n)
    else:
        raise ValueError(f"f8e4m3: scales must be [], [1], [{n}] or [{n}, 1] (or blocks with block=128), "
                         f"got {list(scale.shape)}")
    return QuantWeight("f8e4m3", 0, _packed(q, 16), None, _packed(rows, 16), n, k, dtype)


_BLOCKWISE: dict[int, bool] = {}   # device index -> cuBLAS took the blockwise-scaled fp8 product


def quantize_fp8_rows_cuda(x: torch.Tensor, cache=None, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_rows in one pass on an sm_89+ GPU (codegen/dequant.QuantRowsPlan): the same
    e4m3 bytes and f32 scales, x [..., K] bf16/f16 with K a multiple of 8; group 128 (scales
    [..., ceil(K / 128)]) or 0, one scale a token (scales [..., 1]: quantize_fp8_rows(x, K))."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = _packed(x.reshape(-1, k), 16)
    m = x2.shape[0]
    key = ("rows", k, x.dtype, x.device.index, group)
    launcher = _DEQUANT.get(key)
    if launcher is None:
        from ..codegen.dequant import QuantRowsPlan
        from .launch import device_arch, load_plan
        plan = QuantRowsPlan(dtype="bf16" if x.dtype == torch.bfloat16 else "f16", k=k, arch=device_arch(x.device),
                             group=group)
        launcher = _DEQUANT[key] = load_plan(plan, x.device, cache)
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, -(-k // FP8_BLOCK) if group else 1, dtype=torch.float32, device=x.device)
    if m:
        launcher((m,), [x2, q, s, m])
    return q.view(*lead, k), s.view(*lead, s.shape[-1])


def _scaled_mm_blockwise(q: torch.Tensor, s: torch.Tensor, qw: QuantWeight, dtype) -> torch.Tensor | None:
    """The W8A8 product on the fp8 tensor cores through torch's cuBLAS binding, with exactly the
    kernel's operands: x's e4m3 bytes with one scale per token and 128 k (cuBLAS's 1 x 128 block
    scaling) and W's bytes with its 128 x 128 block scales, or its row scales given as 1 x 128
    blocks of W's rows (every block of a row the row's scale). Returns y [..., N] in `dtype`, or None
    where cuBLAS has no such product (it needs sm_90, CUDA 12.9+, K a multiple of 128; the
    first refusal on a device is remembered; 128 x 128 blocks also K / 128 a multiple of 4)."""
    dev = q.device
    if qw.k % FP8_BLOCK or _BLOCKWISE.get(dev.index) is False or _capability(dev) != (9, 0):
        return None
    lead = q.shape[:-1]
    q2 = q.reshape(-1, qw.k)
    kb = qw.k // FP8_BLOCK
    a_scale = s.reshape(-1, kb).t().contiguous().t()                 # [M, K / 128], M-major
    if qw.group:                                                      # [N / 128, K / 128] -> its transpose
        if kb % 4:            # cuBLAS wants the k blocks padded to a multiple of 4 here: not taken
            return None
        b_scale = qw.wscale.t()
    else:                                                             # row scales as 1 x 128 blocks: [K / 128, N]
        b_scale = qw.wscale[None, :].expand(kb, qw.n).contiguous()
    try:
        y = torch._scaled_mm(q2, qw.qweight.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=dtype)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        if torch.cuda.is_current_stream_capturing():
            raise
        _BLOCKWISE[dev.index] = False
        return None
    _BLOCKWISE[dev.index] = True
    return y.reshape(*lead, qw.n)


class _Fp8GemmLauncher:
    """A loaded Hopper FP8 GEMM (codegen/gemm.py fp8) with its tensor maps made per call (runtime/tma.py caches them)."""

    __slots__ = ("plan", "launcher", "sms")

    def __init__(self, plan, launcher, sms: int):
        self.plan, self.launcher, self.sms = plan, launcher, sms

    def __call__(self, q, xscale, w, wscale, bias, y, rows: int) -> None:
        boxes = self.plan.tma_boxes
        args = [tensor_map(q, boxes["x"]), tensor_map(w, boxes["w"]), xscale, wscale,
                *([bias] if bias is not None else []), tensor_map(y, boxes["out"]), rows]
        self.launcher((rows, self.sms), args)


def fp8_scaling(xscale: torch.Tensor | None, rows: int, k: int, wgroup: int, device: torch.device) -> str | None:
    """The Hopper FP8 GEMM's scaling (codegen/gemm.py fp8_scales) that x's scales `xscale` and W's scale
    group `wgroup` (0: per row, 128: 128 x 128 blocks) make: "token" (one a row, W per row), "k128" /
    "k128_blocks" (one a row and 128 k); None where they make none (or xscale is not float32 on `device`)."""
    if xscale is None or xscale.dtype != torch.float32 or xscale.device != device:
        return None
    kb = -(-k // FP8_BLOCK)
    if xscale.numel() == rows * kb and (kb > 1 or wgroup):
        return "k128_blocks" if wgroup else "k128"
    return "token" if xscale.numel() == rows and not wgroup else None


def fp8_gemm(q: torch.Tensor, xscale: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, *,
             gated: str | None = None, out: torch.Tensor | None = None, cache=None, bn: int | None = None) -> torch.Tensor:
    """The W8A8 product on Hopper's e4m3 tensor cores (codegen/gemm.py fp8): q float8_e4m3fn
    [..., K] times an e4m3 W (qw) with f32 scales, then bias and act(gate) * up, rounded once to qw's
    activation dtype. The scales say the kernel (codegen/gemm.py fp8_scales):
      xscale one a token ([...] or [..., 1]: quantize_fp8_rows_cuda(x, group=0)), W per row: "token",
        y[m, n] = xscale[m] wscale[n] sum_k q[m, k] W_q[n, k], the tensor cores' own sums;
      xscale per token and 128 k ([..., ceil(K / 128)]: quantize_fp8_rows_cuda(x)), W per row or per
        128 x 128 block: "k128" / "k128_blocks", each 128-k slice scaled into f32 totals.
    sm_90 only; K a multiple of 16, output columns a multiple of 8 (TMA's 16-byte rows; with W
    blocks and gated, 64). Errors before any launch."""
    if qw.wtype != "f8e4m3":
        raise LinearInputError(f"fp8_gemm takes an f8e4m3 weight, got {qw.wtype}")
    k, n = qw.k, qw.n
    n_out = n // 2 if gated else n
    if q.dtype != torch.float8_e4m3fn or q.shape[-1] != k or q.device != qw.device:
        raise LinearInputError(f"q must be float8_e4m3fn [..., {k}] on {qw.device}, got {q.dtype} "
                               f"{tuple(q.shape)} on {q.device}")
    lead = tuple(q.shape[:-1])
    rows = q.numel() // k
    kb = -(-k // FP8_BLOCK)
    scales = fp8_scaling(xscale, rows, k, qw.group, q.device)
    if scales is None:
        raise LinearInputError(f"xscale must be float32 on {q.device} with one scale a token ({rows}) or a token "
                               f"and 128 k ([{rows}, {kb}]; with 128 x 128 W blocks only that), got {xscale.dtype} "
                               f"{tuple(xscale.shape)} on {xscale.device}")
    if gated and n % 2:
        raise LinearInputError(f"a gated product needs an even number of W rows, got {n}")
    if k % 16 or n_out % (64 if gated and qw.group else 8):
        raise LinearInputError(f"fp8_gemm needs K a multiple of 16 and output columns a multiple of 8 (gated with W "
                               f"blocks: 64), got K {k}, {n_out} columns")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != qw.dtype or bias.device != q.device):
        raise LinearInputError(f"bias must be {qw.dtype} [{n}] on {q.device}, got {bias.dtype} {tuple(bias.shape)}")
    if not q.is_cuda or _capability(q.device) != (9, 0):
        raise LinearInputError("fp8_gemm runs on sm_90 (Hopper) GPUs")
    if gated not in (None, *_ACT):
        raise LinearInputError(f"gated must be None or one of {sorted(_ACT)}, got {gated!r}")
    y = torch.empty(rows, n_out, dtype=qw.dtype, device=q.device) if out is None else out
    if tuple(y.shape) != (rows, n_out) or y.dtype != qw.dtype or not y.is_contiguous() or y.data_ptr() % 16:
        raise LinearInputError(f"out must be a contiguous 16-byte aligned {qw.dtype} [{rows}, {n_out}]")
    if rows == 0:
        return y.view(*lead, n_out)
    from .linear import device_properties
    sms = device_properties(q.device).multi_processor_count
    if scales != "token":
        bn = 128   # two accumulator sets
    elif bn is None:
        from ..codegen.gemm import pick_bn
        bn = pick_bn(rows, n_out, bool(gated), sms, (128,) if k <= 128 else (256, 192, 128))
    key = ("fp8_gemm", n, k, gated, bias is not None, qw.dtype, q.device.index, bn, scales)
    launcher = _DEQUANT.get(key)
    if launcher is None:
        from ..codegen.gemm import plan_gemm
        from .launch import load_plan
        plan = plan_gemm("bf16" if qw.dtype == torch.bfloat16 else "f16", n=n, k=k, gated=gated, bias=bias is not None,
                         bn=bn, tma=True, persistent=True, tma_store=True, fp8=True, fp8_scales=scales)
        launcher = _DEQUANT[key] = _Fp8GemmLauncher(plan, load_plan(plan, q.device, cache), sms)
    launcher(_packed(q.reshape(rows, k), 16), _packed(xscale.reshape(rows, -1), 16), qw.qweight, qw.wscale,
             None if bias is None else _packed(bias, 16), y, rows)
    return y.view(*lead, n_out)


def _fp8_gemm_takes(x: torch.Tensor, qw: QuantWeight, gated=None) -> bool:
    """Whether the Hopper FP8 GEMM (fp8_gemm) takes x and qw at all: an sm_90 GPU, e4m3 W, its shapes."""
    return (qw.wtype == "f8e4m3" and _gpu_ok(x, qw) and _capability(x.device) == (9, 0) and qw.k % 16 == 0
            and (qw.n // 2 if gated else qw.n) % (64 if gated and qw.group else 8) == 0)


def _fp8_gemm_ok(x: torch.Tensor, qw: QuantWeight, rows: int, gated, norm) -> bool:
    """Whether gemv_quant's W8A8 runs the FP8 GEMM: it takes the call, from FP8_GEMM_MIN_ROWS rows."""
    return rows >= FP8_GEMM_MIN_ROWS and norm is None and _fp8_gemm_takes(x, qw, gated)


def _fp8_per_token(qw: QuantWeight) -> bool:
    return FP8_GEMM_SCALES == "token" and qw.group == 0


def fp8_activation_group(x: torch.Tensor, qw: QuantWeight, *, gated: str | None = None, norm=None) -> int:
    """The k per activation scale gemv_quant's W8A8 product of x takes (the module's docstring):
    qw.k (one scale a token: the Hopper FP8 GEMM's calls with FP8_GEMM_SCALES "token" and a
    row-scaled W) or FP8_BLOCK."""
    rows = x.numel() // qw.k if qw.k else 0
    return qw.k if _fp8_gemm_ok(x, qw, rows, gated, norm) and _fp8_per_token(qw) else FP8_BLOCK


def _fp8_token_gemm_ok(x: torch.Tensor, qw: QuantWeight) -> bool:
    """fp8_gemm's "token" scaling takes x and the row-scaled qw (at any row count): _fp8_gemm_ok's
    conditions without its row threshold (which picks the scaling gemv_quant's W8A8 runs, not whether
    this one can)."""
    return not qw.group and _fp8_gemm_takes(x, qw)


# gemv_quant's W8A8 calls (no norm prologue) of up to this many rows quantise x in the product's registers by
# default, past it x first (fp8_x_first_default; 0: x first at every row count). Measured on an H100 (bench_gemv
# --quant, the layer's call, in registers against x first, same run; benchmarks/NOTES.md): at 1 / 8 rows 8B q/k/v
# 11.8 / 11.7 against 13.2 / 13.3 us, o 8.5 / 8.5 against 10.2 / 10.3, gate/up 42.9 / 43.5 against 44.9 / 45.4, down
# 22.7 / 23.0 against 25.4 / 25.9; 70B 4-9 % faster (o 25.9 against 28.4 at 1 row). At 16 rows mixed: 8B o and down
# 7-11 % faster, q/k/v 1-4 % slower, the 70B products a tie and the lm_head 5 % slower (the run before): x first there
FP8_REGISTER_MAX_ROWS = 8


def fp8_x_first_default(rows: int | None = None, measured: Callable[[], bool | None] | None = None) -> bool:
    """Whether W8A8 calls of up to FP8_KERNEL_MAX_ROWS rows quantise x first (the row kernel,
    quantize_fp8_rows_cuda) and run the small-token e4m3 kernel over those bytes (fp8_gemv; codegen/gemv.py
    x_e4m3): fp8_linear_per_token (x per token; rows None) instead of the FP8 GEMM's 128-row tiles, gemv_quant's
    W8A8 without a norm prologue (x per token and 128 k; `rows` its rows) instead of quantising x in the
    product's registers, the latter past FP8_REGISTER_MAX_ROWS rows (up to them the in-register kernel is 4-17 %
    faster since its rules came from `layerforge tune`; x first became the default when that kernel was 1.3-2.1x
    slower), or as measured() says where it gives True or False (the path the tuning tables measured faster for
    the call's problem, fp8_path_measured: looked up only where the switch is unset); LAYERFORGE_FP8_QUANT_X_FIRST=0
    turns x first off and =1 on at every call."""
    from ..codegen.plan import env_switch
    switch = env_switch("LAYERFORGE_FP8_QUANT_X_FIRST", None)
    if switch is not None:
        return switch
    path = measured() if measured is not None else None
    if path is not None:
        return path
    return rows is None or rows > FP8_REGISTER_MAX_ROWS


_PATHS: dict[tuple, bool | None] = {}   # (tables' generation, problem, device) -> the measured path (None: none)


def fp8_path_measured(x: torch.Tensor, qw: QuantWeight, rows: int, gated) -> bool | None:
    """The W8A8 path the tuning tables measured faster for gemv_quant's call of this problem (family "fp8_path",
    runtime/tune.tune_fp8_paths): True x first, False in registers; None where none is recorded."""
    from ..codegen import tuning
    from ..codegen.gemv import token_bucket
    bucket = token_bucket(rows, qw.wtype)
    key = (tuning.generation(), x.dtype, qw.n, qw.k, qw.group, bucket, gated, x.device.index)
    if key not in _PATHS:
        from .launch import device_arch
        entry = tuning.lookup("fp8_path", arch=device_arch(x.device), dtype="bf16" if x.dtype == torch.bfloat16 else
                              "f16", wtype="f8e4m3", group=qw.group, gated=gated, n=qw.n, k=qw.k, bucket=bucket)
        _PATHS[key] = None if entry is None else bool(entry["x_first"])
    return _PATHS[key]


def _fp8_gemv_ok(x: torch.Tensor, qw: QuantWeight, rows: int, per_token: bool = False, gated=None) -> bool:
    """fp8_gemv takes the call of x quantised first: the switch on (per_token: fp8_linear_per_token's call, else
    gemv_quant's of `rows` with `gated`: the path the tuning tables measured faster for it, else the rows' rule),
    1 to FP8_KERNEL_MAX_ROWS rows on an sm_89+ GPU (x in W's dtype), K a multiple of 16 (the kernel's 16-byte
    pieces of W and x)."""
    if not (qw.wtype == "f8e4m3" and 1 <= rows <= FP8_KERNEL_MAX_ROWS and qw.k % 16 == 0 and _gpu_ok(x, qw)):
        return False
    if per_token:
        return fp8_x_first_default()
    return fp8_x_first_default(rows, lambda: fp8_path_measured(x, qw, rows, gated))


def fp8_gemv(q: torch.Tensor, xscale: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, *,
             gated: str | None = None, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
             cache=None) -> torch.Tensor:
    """The W8A8 product of x quantised beforehand, up to FP8_KERNEL_MAX_ROWS rows on an sm_89+ GPU: the
    small-token e4m3 kernel reading q's bytes (codegen/gemv.py x_e4m3). q float8_e4m3fn [rows, K] (K a
    multiple of 16) with xscale f32 [rows, 1] (one a token: W must have one scale a row; the epilogue scales
    by both) or [rows, ceil(K / 128)] (a token and 128 k, as quantize_fp8_rows_cuda(x) makes: each 128-k
    chunk's sums scaled by x's and, for 128 x 128 blocks, W's scale); then + bias, act(gate) * up over W's
    two row halves (`gated`), + residual, in qw's dtype. `out`: a contiguous tensor of y's shape [rows, N or
    N / 2] in qw's dtype. fp8_gemm's counterpart for decode-sized calls; errors before any launch."""
    from ..codegen.gemv import plan_gemv
    from .launch import device_arch, load_plan
    from .linear import _tiles
    if q.dim() != 2 or q.dtype != torch.float8_e4m3fn or q.shape[1] != qw.k or qw.k % 16 or qw.wtype != "f8e4m3":
        raise LinearInputError(f"fp8_gemv: q must be float8_e4m3fn [rows, {qw.k}] (K a multiple of 16) and W f8e4m3, "
                               f"got {q.dtype} {tuple(q.shape)}, W {qw.wtype}")
    rows, k = q.shape
    kb = -(-k // FP8_BLOCK)
    if not 1 <= rows <= FP8_KERNEL_MAX_ROWS:
        raise LinearInputError(f"fp8_gemv serves 1 to {FP8_KERNEL_MAX_ROWS} rows, got {rows}")
    if xscale.dtype != torch.float32 or tuple(xscale.shape) not in ((rows, 1), (rows, kb)):
        raise LinearInputError(f"fp8_gemv: xscale must be f32 [rows, 1] or [rows, {kb}], got {xscale.dtype} "
                               f"{tuple(xscale.shape)}")
    x_group = 0 if xscale.shape[1] == 1 and not qw.group else FP8_BLOCK
    if qw.group and xscale.shape[1] != kb:
        raise LinearInputError(f"fp8_gemv: W's 128 x 128 blocks need x's scales a token and 128 k ([rows, {kb}]), got "
                               f"{tuple(xscale.shape)}")
    if gated is not None and (gated not in _ACT or qw.n % 2):
        raise LinearInputError(f"fp8_gemv: gated must be one of {sorted(_ACT)} over an even number of W rows, got "
                               f"{gated!r} with {qw.n}")
    n_out = qw.n // 2 if gated else qw.n
    if not q.is_cuda or q.device != qw.device or xscale.device != q.device or _capability(q.device) < divmod(
            FP8_MIN_ARCH, 10):
        raise LinearInputError(f"fp8_gemv runs on an sm_89+ GPU with q, xscale and W on one device, got q on "
                               f"{q.device}, xscale on {xscale.device}, W on {qw.device}")
    for name, t, shape in (("bias", bias, (qw.n,)), ("residual", residual, (rows, n_out)), ("out", out, (rows, n_out))):
        if t is not None and (tuple(t.shape) != shape or t.dtype != qw.dtype or t.device != q.device):
            raise LinearInputError(f"fp8_gemv: {name} must be {qw.dtype} {list(shape)} on {q.device}, got {t.dtype} "
                                   f"{tuple(t.shape)} on {t.device}")
    if out is not None and not out.is_contiguous():
        raise LinearInputError("fp8_gemv: out must be contiguous")
    tiles = _tiles(rows)
    key = ("fp8_gemv", qw.n, k, tiles, qw.group, x_group, gated, bias is not None, residual is not None, qw.dtype,
           q.device.index)
    launcher = _DEQUANT.get(key)
    if launcher is None:
        plan = plan_gemv("bf16" if qw.dtype == torch.bfloat16 else "f16", n=qw.n, k=k, max_m=tiles, gated=gated,
                         bias=bias is not None, residual=residual is not None, arch=device_arch(q.device),
                         wtype="f8e4m3", group=qw.group, x_e4m3=True, x_group=x_group)
        launcher = _DEQUANT[key] = load_plan(plan, q.device, cache)
    y = out if out is not None else torch.empty(rows, n_out, dtype=qw.dtype, device=q.device)
    args = [_packed(q, 16), qw.qweight, qw.wscale, xscale.contiguous()]
    args += [_packed(bias, 16)] if bias is not None else []
    args += [_packed(residual, 16)] if residual is not None else []
    launcher((), args + [y, rows])
    return y


def fp8_linear_per_token(x: torch.Tensor, qw: QuantWeight, *, out: torch.Tensor | None = None,
                         cache=None) -> torch.Tensor:
    """W8A8 with one activation scale a token at every row count, dsl/stdlib/quant.lf fp8_linear_per_token's
    meaning: x [..., K] quantised as quantize_fp8_rows(x, K) does (q = e4m3(x * (448 / amax)) rounded once,
    scale amax * f32(1 / 448), a token of zeros all zeros), times a row-scaled e4m3 W (pack_fp8(q, s) per
    channel): y = T(scale_x[m] * sum_k q[m, k] W[n, k]) with W = q_w s_w, rounded to x's dtype once.
    gemv_quant's W8A8 differs below FP8_GEMM_MIN_ROWS (x by 1 x 128 blocks, the small-token kernel's).
    Routes, each with these scales:
      with fp8_x_first_default() (on unless LAYERFORGE_FP8_QUANT_X_FIRST=0), up to FP8_KERNEL_MAX_ROWS rows on
        sm_89+, K a multiple of 16: quantize_fp8_rows_cuda(x, group=0) and fp8_gemv (the small-token e4m3 kernel);
      sm_90, K a multiple of 16, N of 8: quantize_fp8_rows_cuda(x, group=0) and fp8_gemm's "token" scaling
        (the e4m3 tensor cores' sums scaled by x's and W's scales in the epilogue), any number of rows;
      elsewhere (the CPU, other GPUs, other K / N): the same e4m3 bytes and scales in torch, the dequantised
        x times W in f32 (what the reference evaluator computes), rounded once.
    Errors (LinearInputError) before anything runs."""
    if qw.wtype != "f8e4m3" or qw.group:
        raise LinearInputError(f"fp8_linear_per_token takes an f8e4m3 weight with one scale a row, got {qw.wtype} "
                               f"group {qw.group}")
    k, n = qw.k, qw.n
    if x.dtype != qw.dtype or x.dim() < 1 or x.shape[-1] != k or x.device != qw.device:
        raise LinearInputError(f"x must be {qw.dtype} [..., {k}] on {qw.device}, got {x.dtype} {tuple(x.shape)} on "
                               f"{x.device}")
    lead = tuple(x.shape[:-1])
    if out is not None and (tuple(out.shape) != (*lead, n) or out.dtype != x.dtype or out.device != x.device):
        raise LinearInputError(f"out must be {x.dtype} {[*lead, n]} on {x.device}, got {out.dtype} "
                               f"{tuple(out.shape)} on {out.device}")
    rows = x.numel() // k
    small = _fp8_gemv_ok(x, qw, rows, per_token=True)
    if small or _fp8_token_gemm_ok(x, qw):
        q, s = quantize_fp8_rows_cuda(x.reshape(rows, k), cache, group=0)
        direct = out is not None and out.is_contiguous() and out.data_ptr() % 16 == 0
        y = (fp8_gemv if small else fp8_gemm)(q, s, qw, out=out.view(rows, n) if direct else None, cache=cache)
        if out is None:
            return y.view(*lead, n)
        return out if direct else out.copy_(y.view(*lead, n))
    q, s = quantize_fp8_rows(x, k)   # s [..., 1]
    w = qw.qweight.float() * qw.wscale.float()[:, None]
    y = ((q.float() * s) @ w.T).to(x.dtype)
    return y if out is None else out.copy_(y)


def _fp8_product(x, qw: QuantWeight, bias, gated, residual, norm, norm_offset, cache=None) -> torch.Tensor:
    """The W8A8 product in torch, the kernel's meaning: x (times gamma + offset) quantised as
    quantize_fp8_rows, the dequantised operands multiplied in f32 (on a GPU that has the kernels:
    W dequantised to x's dtype by dequantize_cuda, x's dequantised values rounded to it, and
    cuBLAS, accumulating in f32), rstd, bias, act(gate) * up, residual, rounded to x's dtype once
    at the end."""
    u = x
    if norm is not None:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm[1])
        u = (xf * (norm[0].float() + norm_offset)).to(x.dtype)
    rows = x.numel() // qw.k
    ours = _fp8_gemm_ok(x, qw, rows, gated, norm)
    if ours and not qw.group:   # a row-scaled W on the Hopper FP8 GEMM (the module's docstring)
        q, s = quantize_fp8_rows_cuda(x, cache, group=0 if _fp8_per_token(qw) else FP8_BLOCK)
        return _epilogue(fp8_gemm(q, s, qw, bias, gated=gated, cache=cache), None, residual)
    blockwise = _gpu_ok(x, qw) and x.numel() and norm is None and qw.k % 8 == 0
    q, s = quantize_fp8_rows_cuda(u, cache) if blockwise else quantize_fp8_rows(u)
    # 128 x 128 W blocks: cuBLAS's blockwise product where it takes them (0.79-0.92 x its time ours,
    # benchmarks/NOTES.md), else the Hopper FP8 GEMM's k128_blocks
    y = _scaled_mm_blockwise(q, s, qw, x.dtype) if blockwise else None
    if y is None and ours:
        return _epilogue(fp8_gemm(q, s, qw, bias, gated=gated, cache=cache), None, residual)
    if y is not None:   # cuBLAS rounded the sums to x's dtype: the rest as the bf16 products do it
        return _epilogue(y if bias is None else y + bias, gated, residual)
    xd = (q.float() * s.repeat_interleave(FP8_BLOCK, -1)[..., : qw.k])
    if _gpu_ok(x, qw) and x.numel():
        y = F.linear(xd.to(x.dtype), dequantize_cuda(qw, cache)).float()
    else:
        y = xd @ dequantize(qw).float().T
    if norm is not None:
        y = y * rstd
    if bias is not None:
        y = y + bias.float()
    if gated:
        g, up = y.chunk(2, dim=-1)
        y = _ACT[gated](g) * up
    if residual is not None:
        y = y + residual.float()
    return y.to(x.dtype)


# ---- the product -------------------------------------------------------------------------------
# Rows the small-token kernel serves; past them W is dequantised on the GPU (codegen/dequant.py)
# and the product is cuBLAS's. Measured on the H200 at 32 rows (benchmarks/NOTES.md, "Quantised
# products past 16 rows"): the kernel 0.77-1.12 x bf16 cuBLAS, dequantisation + cuBLAS 0.26-0.32 x.
# (u4's 64-row plans do not fit shared memory: a stage holds 256 k of x a token.) f8e4m3 stays at
# 16: its 32-row plans are 0.34-0.57 x cuBLAS and the gated block-scaled one spills.
QUANT_KERNEL_MAX_ROWS = 32
FP8_KERNEL_MAX_ROWS = 16
# Calls of at least this many rows with a row-scaled f8e4m3 W (no norm prologue) on sm_90 quantise x
# per token (one pass, codegen/dequant.QuantRowsPlan group 0) and run the Hopper FP8 GEMM
# (codegen/gemm.py fp8, fp8_gemm) instead of 1 x 128 blocks and cuBLAS's blockwise-scaled product.
# Measured (benchmarks/bench_fp8.py, H200): from 256 rows faster at every Llama-3 shape (8B down
# 38.6 against 50.4 us); at 64-128 rows the o / down products are not (41.2 against 25.5 us at 64:
# 32 tiles of 128 x 128 for 132 SMs)
FP8_GEMM_MIN_ROWS = 256
# Its scaling with a row-scaled W: "token" (x per token, the tensor cores' own sums) or "k128" (x per
# token and 128 k as decode quantises it, sums promoted to f32 every 128 k); 128 x 128 W blocks: "k128"
FP8_GEMM_SCALES = "token"
# Calls of STREAM_QUANT_ROWS[0] .. [1] rows with a weight type in STREAM_WTYPES run, on sm_90, the
# decode-range GEMM with W converted in registers (codegen/gemm_stream.py, wtype "u4" / "i8") instead of
# dequantising W for cuBLAS (benchmarks/bench_gemv.py --quant, H200: u4 1.5-3.6x faster at 64-128 rows;
# i8 8B qkv / gate/up at 64 rows 17.2 / 54.3 us against 34.2 / 172.1 dequantising). It reads W repacked
# by pack_stream_u4 / pack_stream_i8, a second copy of the weight's bytes made at its first such call
# and kept while the weight lives: (1, 0) turns the route off and keeps one copy.
STREAM_QUANT_ROWS = (QUANT_KERNEL_MAX_ROWS + 1, 128)
STREAM_WTYPES = ("u4", "i8")
# By default (LAYERFORGE_U4_STREAM_WIDE=0 turns it off: u4_stream_wide_default), u4 with more than
# STREAM_U4_WIDE_ELEMENTS weights takes the decode-range GEMM from STREAM_U4_WIDE_ROWS rows (25; 17 where gated or at
# least STREAM_U4_HUGE_ELEMENTS). H200, bench_gemv --stream --quant --tokens 20,32 (small-token
# kernel -> GEMM, us at 20 / 32 rows): 8B qkv 15.8 / 19.0 -> 15.2 / 15.1 (its default split), gate/up 49.7 / 55.3 ->
# 38.6 / 39.0, down 22.1 / 26.4 -> 23.2 / 23.6, 70B qkv 46.3 / 54.5 -> 28.3 / 28.2, o 37.1 / 44.4 -> 22.7 / 23.2; at 16
# rows the small-token kernel is faster everywhere, and on 8B's o (4096 x 4096) at 20-32 rows too (7.9 / 9.3 -> 11.8).
# H100, bench_gemv --quant --tokens 16,20,25,32, the switch off -> on (us at 20 / 25 / 32 rows): 8B qkv 16.0 / 17.0 /
# 18.7 -> 15.8 / 15.4 / 15.4, gate/up 48.9 / 52.0 / 54.1 -> 48.6 / 48.6 / 49.3, down 21.5 / 23.3 / 26.2 -> 21.3 / 23.5 /
# 23.0, 70B qkv 45.7 / 48.9 / 53.1 -> 31.4 / 30.6 / 31.0, gate/up 174.2 / 181.5 / 194.5 -> 144.9 / 138.6 / 138.8
STREAM_U4_WIDE_ROWS = (17, 25)
STREAM_U4_WIDE_ELEMENTS = 4096 * 4096
STREAM_U4_HUGE_ELEMENTS = 8192 * 8192
_STREAM_PACKS: dict[tuple[int, str], tuple] = {}   # (id of qweight, plan key) -> (weakref, versions, packed W)
_DEQUANT: dict[tuple, object] = {}      # (wtype, group, n, k, dtype, device) -> launcher; ("rows", k, ...): x to e4m3


def _gpu_ok(x: torch.Tensor, qw: QuantWeight) -> bool:
    return (x.is_cuda and x.dtype == qw.dtype and not torch.compiler.is_compiling() and device_major(x.device) >= 8
            and (qw.wtype != "f8e4m3" or _capability(x.device) >= divmod(FP8_MIN_ARCH, 10)))


def _kernel_ok(x: torch.Tensor, qw: QuantWeight, rows: int) -> bool:
    limit = min(QUANT_KERNEL_MAX_ROWS, FP8_KERNEL_MAX_ROWS) if qw.wtype == "f8e4m3" else QUANT_KERNEL_MAX_ROWS
    return 1 <= rows <= limit and _gpu_ok(x, qw)


def u4_stream_wide_default() -> bool:
    """Whether wide u4 weights take the decode-range GEMM from 17 / 25 rows (STREAM_U4_WIDE_ROWS): on by default,
    measured faster on an H200 and an H100 (benchmarks/NOTES.md, "u4 at 17-32 rows") once its GPU test
    (tests/gpu/test_gemm_stream.py -k from_17: the u4 GEMM's 32-token tiles against the dequantised reference)
    passed; LAYERFORGE_U4_STREAM_WIDE=0 keeps the small-token kernel to 32 rows."""
    from ..codegen.plan import env_switch
    return env_switch("LAYERFORGE_U4_STREAM_WIDE", True)


def _stream_ok(x: torch.Tensor, qw: QuantWeight, rows: int, gated) -> bool:
    from ..codegen.gemm_stream import max_rows
    unknown = set(STREAM_WTYPES) - {"u4", "i8"}
    if unknown:   # a misspelt or unsupported entry is an error, not a silently unused one
        raise ValueError(f"quant.STREAM_WTYPES may hold 'u4' and 'i8', got {sorted(unknown)}")
    first, size = STREAM_QUANT_ROWS[0], qw.n * qw.k
    if qw.wtype == "u4" and size > STREAM_U4_WIDE_ELEMENTS and u4_stream_wide_default():
        first = min(first, STREAM_U4_WIDE_ROWS[0 if gated or size >= STREAM_U4_HUGE_ELEMENTS else 1])
    return (qw.wtype in STREAM_WTYPES and not (qw.wtype == "i8" and qw.group)
            and first <= rows <= min(STREAM_QUANT_ROWS[1], max_rows(gated, qw.wtype))
            and _gpu_ok(x, qw) and _capability(x.device) == (9, 0))


def stream_packed(qw: QuantWeight, plan) -> torch.Tensor:
    """qw's W in the plan's pack_stream_u4 / pack_stream_i8 layout, made once a (weight, plan) and kept while the
    weight lives and is not written in place (its tensors' version counters are part of the key:
    load_state_dict copies into the same buffers); a first call inside CUDA graph capture would pack
    inside the graph: warm up first."""
    import weakref
    key = (id(qw.qweight), plan.key)
    versions = tuple(t._version for t in (qw.qweight, qw.wgroup, qw.wscale) if t is not None)
    hit = _STREAM_PACKS.get(key)
    if hit is not None and hit[0]() is qw.qweight and hit[1] == versions:
        return hit[2]
    for dead in [k for k, (ref, *_) in _STREAM_PACKS.items() if ref() is None]:
        del _STREAM_PACKS[dead]
    packed = (pack_stream_u4 if qw.wtype == "u4" else pack_stream_i8)(qw, plan)
    _STREAM_PACKS[key] = (weakref.ref(qw.qweight), versions, packed)
    return packed


def dequantize_cuda(qw: QuantWeight, cache=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] in the activation dtype from the kernel's layout, by the generated dequantisation
    kernel on qw's (sm_80+; f8e4m3 sm_89+) GPU: the same roundings as the small-token kernel's
    conversions (dequantize is the float64 reference of both)."""
    dev = qw.device
    key = (qw.wtype, qw.group, qw.n, qw.k, qw.dtype, dev.index)
    launcher = _DEQUANT.get(key)
    if launcher is None:
        from ..codegen.dequant import plan_dequant
        from .launch import device_arch, load_plan
        plan = plan_dequant("bf16" if qw.dtype == torch.bfloat16 else "f16", wtype=qw.wtype, group=qw.group,
                            n=qw.n, k=qw.k, arch=device_arch(dev))
        launcher = _DEQUANT[key] = load_plan(plan, dev, cache)
    w = torch.empty(qw.n, qw.k, dtype=qw.dtype, device=dev) if out is None else out
    if tuple(w.shape) != (qw.n, qw.k) or w.dtype != qw.dtype or w.device != dev or not w.is_contiguous():
        raise LinearInputError(f"out must be a contiguous {qw.dtype} [{qw.n}, {qw.k}] on {dev}")
    if w.data_ptr() % 16:   # written in 16-byte pieces
        raise LinearInputError(f"out must start at a 16-byte aligned address; this view starts {w.data_ptr() % 16} "
                               f"bytes past one")
    launcher((), [*qw.kernel_tensors, w])
    return w


def gemv_quant(x: torch.Tensor, qw: QuantWeight, bias: torch.Tensor | None = None, *, gated: str | None = None,
               residual: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None,
               norm_offset: float = 0.0, out: torch.Tensor | None = None, cache=None) -> torch.Tensor:
    """runtime/linear.gemv's product with a quantised W: the generated kernel for up to
    QUANT_KERNEL_MAX_ROWS rows in W's activation dtype on an sm_80+ GPU (f8e4m3: sm_89+; with
    fp8_x_first_default(rows) and no norm prologue, past FP8_REGISTER_MAX_ROWS rows by default, x quantised first
    and fp8_gemv over its bytes); calls of
    STREAM_QUANT_ROWS rows with a STREAM_WTYPES weight (u4, i8 with row scales) and no norm prologue on
    sm_90 the decode-range GEMM with W converted
    in registers (codegen/gemm_stream.py; W packed once by stream_packed); past them on such a GPU
    W dequantised by the generated kernel (dequantize_cuda) and cuBLAS; on the
    CPU W dequantised in float64 and torch's product (f8e4m3: x quantised as the kernel does:
    _fp8_product)."""
    rows = check_call(x, qw.n, qw.k, bias, gated, residual, norm, norm_offset, out)
    if x.device != qw.device:
        raise LinearInputError(f"x is on {x.device}, the quantised weight on {qw.device}")
    if qw.perm is not None:   # act-order: x's columns (and the norm's weights) in the layout's order
        x = x.index_select(-1, qw.perm)
        if norm is not None:
            norm = (norm[0].index_select(0, qw.perm), norm[1])
    if not _kernel_ok(x, qw, rows) and qw.wtype == "f8e4m3":
        y = _fp8_product(x, qw, None if bias is None else bias.to(x.dtype), gated, residual, norm, norm_offset,
                         cache)
        return y if out is None else out.copy_(y)
    if norm is None and _stream_ok(x, qw, rows, gated):   # W converted in the GEMM's registers
        from ..codegen.gemm_stream import plan_gemm_stream, token_tile
        from .linear import STREAM_KERNEL
        plan = plan_gemm_stream("bf16" if x.dtype == torch.bfloat16 else "f16", n=qw.n, k=qw.k, mt=token_tile(rows),
                                gated=gated, bias=bias is not None, residual=residual is not None, wtype=qw.wtype,
                                group=qw.group)
        weights = [stream_packed(qw, plan)] + ([qw.wscale] if qw.wtype == "i8" else [])
        return launch_gemv(x, weights, qw.n, qw.k, None if bias is None else bias.to(x.dtype),
                           gated, residual, norm, norm_offset, out, cache, qw.wtype, qw.group, wgmma=STREAM_KERNEL)
    if not _kernel_ok(x, qw, rows):
        # the module's bias is in W's dtype: x's for torch
        w = dequantize_cuda(qw, cache) if _gpu_ok(x, qw) and rows else _dequantize_layout(qw).to(x.dtype)
        y = _reference(x, w, None if bias is None else bias.to(x.dtype), gated, residual, norm, norm_offset)
        return y if out is None else out.copy_(y)
    if norm is None and _fp8_gemv_ok(x, qw, rows, gated=gated):   # x quantised first (a token and 128 k), the kernel
        # on its bytes
        n_out = qw.n // 2 if gated else qw.n
        lead = tuple(x.shape[:-1])
        q, s = quantize_fp8_rows_cuda(x.reshape(rows, qw.k), cache)
        direct = out is not None and out.is_contiguous() and out.data_ptr() % 16 == 0
        y = fp8_gemv(q, s, qw, bias, gated=gated, residual=None if residual is None else residual.reshape(rows, n_out),
                     out=out.view(rows, n_out) if direct else None, cache=cache)
        if out is None:
            return y.view(*lead, n_out)
        return out if direct else out.copy_(y.view(out.shape))
    return launch_gemv(x, qw.kernel_tensors, qw.n, qw.k, bias, gated, residual, norm, norm_offset, out, cache,
                       qw.wtype, qw.group)


class QuantLinear(torch.nn.Module):
    """A Linear layer whose weight is quantised in the kernel's layout: weight-only u4 or i8, or
    f8e4m3 (W8A8: x quantised too, the module's docstring); forward is runtime/linear.Linear's
    (gated, residual, norm). Build it with a from_* method."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None, *, cache=None):
        super().__init__()
        self.qw = qw
        self.in_features, self.out_features = qw.k, qw.n
        for name, t in (("qweight", qw.qweight), ("wgroup", qw.wgroup), ("wscale", qw.wscale), ("perm", qw.perm),
                        ("bias", bias)):
            self.register_buffer(name, t)
        self._cache = cache

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, group_size: int, bias=None, *, dtype=torch.float16, cache=None):
        return cls(awq_to_kernel(qweight, qzeros, scales, group_size, dtype), _cast(bias, dtype), cache=cache)

    @classmethod
    def from_gptq(cls, qweight, qzeros, scales, g_idx, group_size: int, bias=None, *, dtype=torch.float16,
                  zero_offset: int = 1, cache=None):
        return cls(gptq_to_kernel(qweight, qzeros, scales, g_idx, group_size, dtype, zero_offset),
                   _cast(bias, dtype), cache=cache)

    @classmethod
    def from_fp8(cls, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias=None, block=None, *,
                 dtype=torch.bfloat16, cache=None):
        """An fp8 checkpoint's Linear (the module's docstring): weight float8_e4m3fn [N, K] and
        weight_scale [] / [1] / [N, 1], or with block=128 (a config's weight_block_size [128, 128])
        weight_scale_inv [ceil(N / 128), K / 128]. `dtype` is the activations'."""
        return cls(pack_fp8(weight_fp8, weight_scale, block, dtype), _cast(bias, dtype), cache=cache)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 128, bias=None, *, wtype: str = "u4",
                   dtype: torch.dtype | None = None, cache=None):
        """Quantise a float weight [N, K] by rounding to nearest: u4 asymmetric per group; i8
        symmetric, per row (group_size 0) or per group; f8e4m3 per row (group_size 0) or per
        128 x 128 block (group_size 128)."""
        dtype = dtype or (weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
        if wtype == "u4":
            qw = pack_u4(*quantize_u4(weight, group_size), group_size, dtype)
        elif wtype == "i8":
            qw = pack_i8(*quantize_i8(weight, group_size), group_size, dtype)
        elif wtype == "f8e4m3":
            if group_size not in GROUPS["f8e4m3"]:
                raise ValueError(f"f8e4m3: group size must be one of {GROUPS['f8e4m3']} (128: 128 x 128 blocks), "
                                 f"got {group_size!r}")
            block = group_size or None
            qw = pack_fp8(*quantize_fp8(weight, block), block, dtype)
        else:
            raise ValueError(f"wtype must be 'u4', 'i8' or 'f8e4m3', got {wtype!r}")
        return cls(qw, _cast(bias, dtype), cache=cache)

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the buffers: qw follows. A dtype change is refused: the pairs
        # are T halves stored in int32 words, which a float cast does not reach.
        super()._apply(fn, recurse)
        qw = self.qw
        dtype = qw.dtype if self.wscale is None or qw.wtype == "f8e4m3" else self.wscale.dtype
        if qw.wtype == "f8e4m3" and (self.qweight.dtype != torch.float8_e4m3fn or self.wscale.dtype != torch.float32):
            raise TypeError("QuantLinear: an f8e4m3 weight stays float8_e4m3fn with f32 scales")
        if dtype != qw.dtype or (self.bias is not None and self.bias.dtype != qw.dtype):
            raise TypeError(f"QuantLinear: its dtype is {qw.dtype} (build it with dtype= to change it)")
        self.qw = QuantWeight(qw.wtype, qw.group, self.qweight, self.wgroup, self.wscale, qw.n, qw.k, qw.dtype,
                              self.perm)
        return self

    def dequantized(self) -> torch.Tensor:
        """W [N, K] in float64."""
        return dequantize(self.qw)

    def forward(self, x: torch.Tensor, *, gated: str | None = None, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None, norm_offset: float = 0.0) -> torch.Tensor:
        return gemv_quant(x, self.qw, self.bias, gated=gated, residual=residual, norm=norm, norm_offset=norm_offset,
                          cache=self._cache)


def _cast(bias, dtype):
    return None if bias is None else bias.to(dtype)
