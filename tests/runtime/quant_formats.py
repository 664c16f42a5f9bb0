"""Checkpoint packers written from the format descriptions (runtime/quant.py's docstring), one
nibble at a time, independently of runtime/quant.py's unpackers: the tests' source of AWQ and
GPTQ tensors. q and z are integer tensors in 0..15; W[n, k] = (q[k, n] - z[g, n]) * s[g, n]."""
import torch

AWQ_NIBBLE_ELEMENT = (0, 2, 4, 6, 1, 3, 5, 7)   # nibble i of a word holds column 8j + this


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def pack_along_last(a: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] ints -> int32 [R, C / 8]: word j holds a[:, 8j + order[i]] at bits 4i."""
    r, c = a.shape
    v = torch.zeros(r, c // 8, dtype=torch.int64)
    for i in range(8):
        v |= (a[:, order[i]::8].to(torch.int64) & 0xF) << (4 * i)
    return _to_int32(v)


def awq_tensors(q, z, s):
    """q [K, N], z and s [K / G, N] -> AWQ GEMM (qweight [K, N/8], qzeros [K/G, N/8], scales)."""
    return pack_along_last(q, AWQ_NIBBLE_ELEMENT), pack_along_last(z, AWQ_NIBBLE_ELEMENT), s.half()


def gptq_tensors(q, z, s, group_size, zero_offset=1):
    """q [K, N], z and s [K / G, N] -> GPTQ (qweight [K/8, N] packed along K, qzeros [K/G, N/8]
    holding z - zero_offset, scales, g_idx = k // G)."""
    k, n = q.shape
    qweight = pack_along_last(q.T.contiguous()).T.contiguous()      # word i of column n: k = 8i + j at bits 4j
    qzeros = pack_along_last((z - zero_offset) & 0xF)
    return qweight, qzeros, s.half(), torch.arange(k, dtype=torch.int32) // group_size


def random_u4(k, n, group_size, gen):
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group_size, n), generator=gen)
    s = (torch.rand(k // group_size, n, generator=gen) + 0.5) / (8 * k ** 0.5)
    return q, z, s


def format_dequant(q, z, s, group_size):
    """W [N, K] in float64 from the unpacked format."""
    g = torch.arange(q.shape[0]) // group_size
    return ((q - z[g]) * s.half().double()[g]).T
