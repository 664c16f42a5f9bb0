"""Row kernels split over several blocks per row (consecutive blocks; codegen/row.py `_split_shape`) against
the reference evaluator in float64: outputs poisoned with NaN first, wide and odd widths,
token counts that are not multiples of anything, tensors aligned to 16 bytes and narrowed
ones (the runtime then runs a plan with narrower vectors, split too), and a custom layer whose
outputs permute and interleave the columns."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule

from ..seeding import seeded_generator
from .test_row_kernels import check_close, poisoned

TOKENS = [1, 7, 300]
SRC = """
layer swap_sum(x: T[N, 2*F]) -> (T[N, 2*F], T[N, F], T[N, 2*F]) {
    a, b = split(x, 2, axis=-1)
    return concat(b, a), T(f32(a) + f32(b)), interleave(b, a)
}
"""
# (layer, F, dtype): every one splits at 16-byte alignment (the test checks the grid)
CASES = [("swiglu", 28672, "bf16"), ("swiglu", 14336, "bf16"), ("swiglu", 14336, "f32"), ("swiglu", 10000, "bf16"),
         ("swiglu", 4097, "bf16"), ("swiglu", 5000, "f32"), ("swiglu", 4099, "f16"), ("geglu", 28672, "bf16"),
         ("geglu", 14336, "f16"), ("geglu_tanh", 14336, "bf16"), ("silu_act", 28672, "bf16"),
         ("gelu_tanh_act", 14336, "f32"), ("swap_sum", 8192, "bf16"), ("swap_sum", 4099, "f32")]


@pytest.fixture(scope="module")
def prog():
    return lf.loads(SRC)


def run_case(mod, name, F, dtype, n, offset, gen):
    """One call with inputs (and outputs) `offset` elements past a 16-byte boundary."""
    fn = mod.function
    args = []
    for pname in mod.input_names:
        p = next(q for q in fn.params if q.name == pname)
        width = int(p.shape[-1])
        buf = torch.empty(n * width + offset, dtype=p.dtype.torch, device="cuda")
        buf[offset:] = (torch.randn(n * width, generator=gen) * 2).to(p.dtype.torch).to("cuda")
        args.append(buf[offset:].view(n, width))
    ref = lf.evaluate(fn, dict(zip(mod.input_names, args)), precision="float64")
    outs = []
    for r, o in zip(ref, fn.outputs):
        buf = poisoned(torch.empty(r.numel() + offset, dtype=o.dtype.torch, device="cuda"))
        outs.append(buf[offset:].view(r.shape))
    got = mod(*args, out=tuple(outs))
    got = got if isinstance(got, tuple) else (got,)
    torch.cuda.synchronize()
    for i, (g, r) in enumerate(zip(got, ref)):
        check_close(f"{name} F={F} {dtype} n={n} offset={offset} out {i}", g, r, dtype)


@pytest.mark.parametrize("offset", [0, 1, 2])   # 16-byte aligned; 2-byte (bf16/f16) or 4-byte (f32); 4 or 8
@pytest.mark.parametrize("name,F,dtype", CASES)
def test_split_kernel_matches_reference(prog, name, F, dtype, offset):
    mod = LayerModule(prog.specialise(name, dtype=dtype, F=F), device="cuda")
    gen = seeded_generator("split", name, F, dtype, offset)
    for n in TOKENS:
        run_case(mod, name, F, dtype, n, offset, gen)
    # the module loads its 16-byte kernel to fix the row space; narrowed tensors run a narrower one
    launches = {vec: launch.kernel.abi for (_, vec), launch in mod._launches.items()}
    nbytes = offset * {"bf16": 2, "f16": 2, "f32": 4}[dtype]
    vec = 16 if offset == 0 else min(16, nbytes & -nbytes)
    assert set(launches) == {16, vec}, f"launched {sorted(launches)}, expected {{16, {vec}}}"
    assert launches[16].grid[0].startswith("rows * "), f"{name} F={F} {dtype}: expected a split plan, grid {launches[16].grid}"


def test_split_kernel_in_a_cuda_graph(prog):
    mod = LayerModule(prog.specialise("swiglu", dtype="bf16", F=28672), device="cuda")
    x = torch.randn(37, 2 * 28672, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(37, 28672, device="cuda", dtype=torch.bfloat16)
    mod(x, out=(out,))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mod(x, out=(out,))
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = lf.evaluate(mod.function, {"gu": x}, precision="float64")[0]
    check_close("swiglu graph", out, ref, "bf16")
