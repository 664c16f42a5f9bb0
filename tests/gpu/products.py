"""The float64 meaning of a product call (runtime/linear.gemv and its kernels), shared by the GPU
tests of the small-token, quantised and Hopper products: RMSNorm (gamma + offset), x W^T, bias,
act(gate) * up over the output halves, residual."""
import torch
import torch.nn.functional as F

ACT = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def operands(tag: str, m, n, k, dtype, gated, bias, residual):
    """Fresh random x [m, K], W [N, K] (scaled by 1 / sqrt(K)), bias [N] and residual [m, N_out] (or
    None) on the GPU, drawn from the case's own seed."""
    from ..seeding import seeded_generator
    gen = seeded_generator(tag, m, n, k, dtype, gated, bias, residual)
    n_out = n // 2 if gated else n
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).cuda()
    b = torch.randn(n, generator=gen).to(dtype).cuda() if bias else None
    r = torch.randn(m, n_out, generator=gen).to(dtype).cuda() if residual else None
    return x, w, b, r


def reference(x, w, b, gated, r, norm=None, offset=0.0):
    if norm is not None:
        xd = x.double()
        x = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + norm[1]) * (norm[0].double() + offset)
    return epilogue(x.double() @ w.double().T, b, gated, r)


def epilogue(y, b, gated, r):
    """The product's epilogue on y (float64): + bias, act(gate) * up over its halves, + residual."""
    if b is not None:
        y = y + b.double()
    if gated:
        g, u = y.chunk(2, -1)
        y = ACT[gated](g) * u
    return y if r is None else y + r.double()


def replayed(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) captured in a CUDA graph (after a warm-up call), x refilled with fresh random values,
    the graph replayed: the output of the replay (what a graph-captured call must compute)."""
    fn(x)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fn(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    return y
