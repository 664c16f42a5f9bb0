"""The wgmma prefill's sectioned launch order (WGTileConfig.lpt, templates/cuda/launch_order.jinja): each CTA finds
its (chunk, row block, KV head / split) from its place in the launch order. The kernel's own lines are cut from the
rendered source and run on the host (a C++ compiler), so the order checked is the one the GPU runs: every CTA takes
one item and every item one CTA; sections of the (chunk, z) pairs of equal sizes (off by one) run level by level from
the longest row block; a launch whose X pairs hold lpt CTAs keeps the default order; the K / V rows of a section stay
within the L2 budget. The plans compile for sm_90a without spills (no GPU needed)."""
import dataclasses
import functools
import itertools
import shutil
import subprocess

import pytest

import layerforge as lf
from layerforge.codegen import attention_wgmma as aw
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention

from .test_attention_compile import specialise
from .test_attention_wgmma_compile import assert_spill_free, compile_main

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
HOST = """#include <algorithm>
#include <cstdio>
using std::min; using std::max;
struct Dim { unsigned x, y, z; };
constexpr int BM = %(BM)d, HD = %(HD)d, HDV = %(HDV)d, GROUP = %(GROUP)d;
int main() {
    Dim gridDim;
    while (std::scanf("%%u %%u %%u", &gridDim.x, &gridDim.y, &gridDim.z) == 3) {
        for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
        for (unsigned bx = 0; bx < gridDim.x; ++bx) {
            const Dim blockIdx{bx, by, bz};
%(BODY)s
            std::printf("%%d %%d %%d\\n", chunk, level, zz);
        }
    }
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def order_lines(src: str) -> str:
    """The kernel's lines from `int chunk, level, zz;` to the end of the block that sets them."""
    start = src.index("    int chunk, level, zz;")
    end = src.index("\n    }\n", start) + len("\n    }\n")
    return src[start:end]


@functools.lru_cache(maxsize=None)
def host_order(plan, tmp):
    """A host program of the plan's order lines; returns a function grid -> [(chunk, level, z)] in launch order."""
    exe = tmp / f"order_{plan.config.label}_{plan.group}"
    (tmp / "order.cpp").write_text(HOST % dict(BM=plan.config.rows, HD=int(plan.spec.head_dim),
                                               HDV=int(plan.spec.v_head_dim), GROUP=plan.group,
                                               BODY=order_lines(plan.source())))
    subprocess.run([CXX, "-std=c++17", "-O1", "-o", str(exe), str(tmp / "order.cpp")], check=True)
    return places_of(exe)


def places_of(exe):
    """A function grids -> for each grid (x, y, z), the x * y * z (chunk, level, z) lines that the host program `exe`
    prints for it (it reads the grids from its input, one a line)."""
    def run(grids):
        out = subprocess.run([str(exe)], input="".join(f"{x} {y} {z}\n" for x, y, z in grids), capture_output=True,
                             text=True, check=True).stdout.split("\n")
        rows = iter(tuple(map(int, line.split())) for line in out if line)
        return [[next(rows) for _ in range(x * y * z)] for x, y, z in grids]
    return run


def expected(plan, x, y, z):
    """The order as specified: where X * Y >= lpt, the default one; else sections of k = ceil(lpt / (X * Y)) z values
    (at most Z, at least one, their pairs' K / V rows within LPT_L2), cutting Z into equal sizes (the first Z %
    sections one larger); in each, every pair's level 0 (the longest row block), then level 1, ..., pairs chunk
    fastest, then z."""
    if x * y >= plan.config.lpt:
        return [(bx, by, bz) for bz in range(z) for by in range(y) for bx in range(x)]
    pair_kb = y * plan.config.rows * (int(plan.spec.head_dim) + int(plan.spec.v_head_dim)) * 2 // plan.group // 1024 + 1
    k = max(1, min(-(-plan.config.lpt // (x * y)), z, (aw.LPT_L2 // 1024) // (pair_kb * x)))
    nsec = -(-z // k)
    base, extra = divmod(z, nsec)
    out, z0 = [], 0
    for s in range(nsec):
        size = base + (s < extra)
        out += [(c, level, zz) for level in range(y) for zz in range(z0, z0 + size) for c in range(x)]
        z0 += size
    return out


GRIDS = [(1, 1, 1), (1, 8, 32), (4, 32, 32), (4, 128, 8), (2, 32, 16), (3, 7, 5), (5, 1, 7), (1, 256, 4),
         (7, 13, 24), (12, 3, 3), (1, 64, 1)]


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler to run the kernel's order lines")
@pytest.mark.parametrize("lpt", [1, 5, 40, aw.LPT_CTAS, 528])
@pytest.mark.parametrize("d,hq,hkv,consumers", [(128, 32, 8, 2), (256, 16, 16, 2), (64, 16, 16, 3)])
def test_order_is_a_bijection_longest_first(prog, tmp_path_factory, d, hq, hkv, consumers, lpt):
    c = aw.tile_candidates(d)[-1] if consumers == 2 and d == 64 else aw.tile_candidates(d)[0]
    tiles = WGTileConfig(bn=c.bn, stages=c.stages, consumers=consumers, lpt=lpt)
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", hq, hkv, d), tiles=tiles)
    run = host_order(plan, tmp_path_factory.mktemp("lpt"))
    for (x, y, z), got in zip(GRIDS, run(GRIDS)):
        assert sorted(got) == sorted(itertools.product(range(x), range(y), range(z))), (x, y, z)
        assert got == expected(plan, x, y, z), (x, y, z)
        # the launch's last CTA is a shortest row block (level Y - 1) and every pair's levels go longest first
        assert got[-1][1] == y - 1
        seen = {}
        for chunk, level, zz in got:
            assert seen.get((chunk, zz), -1) == level - 1
            seen[(chunk, zz)] = level


def test_sections_keep_kv_within_l2(prog):
    """Where sections grow, their pairs' K / V stay within LPT_L2: at lpt 528, 30 row blocks of one chunk would
    take 18 of 16 z values into a section; at D256 a pair's K / V is 3.9 MB, so 32 MB holds 8."""
    plan = plan_wgmma_attention(specialise(prog, "gpt2_attn", 16, 16, 256), tiles=WGTileConfig(bn=64, stages=2,
                                                                                                lpt=528))
    got = expected(plan, 1, 30, 16)   # 30 row blocks of 128 rows: 3840 tokens x 1 KB of K / V a pair
    assert [lvl for _, lvl, _ in got[:8]] == [0] * 8 and got[8] == (0, 1, 0)   # two sections of 8
    plan = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, lpt=aw.LPT_CTAS))
    short = expected(plan, 1, 8, 32)   # a short prompt (8 row blocks a head): sections of 16 heads at lpt 128
    assert [lvl for _, lvl, _ in short[:16]] == [0] * 16 and short[16] == (0, 1, 0) and short[128] == (0, 0, 16)
    two = expected(plan, 2, 8, 32)   # two chunks: 8 heads a section, chunk fastest
    assert two[:4] == [(0, 0, 0), (1, 0, 0), (0, 0, 1), (1, 0, 1)] and two[16] == (0, 1, 0)


@pytest.mark.parametrize("d", [64, 128, 256])
def test_planner_and_compile(prog, d):
    """lpt=True gives the chosen tiles lpt=LPT_CTAS (label 'l'), nothing else; the kernel compiles without spills.
    The default order's kernel has none of the lines."""
    layer = specialise(prog, "llama_attn", 32, 8, d)
    plain = plan_wgmma_attention(layer)
    plan = plan_wgmma_attention(layer, lpt=True)
    assert plan.config == dataclasses.replace(plain.config, lpt=aw.LPT_CTAS) and plan.config.label.endswith("l")
    assert "LPT_CTAS" in plan.source() and "LPT_CTAS" not in plain.source()
    assert (plan.abi.args, plan.abi.grid, plan.shared_bytes) == (plain.abi.args, plain.abi.grid, plain.shared_bytes)
    assert_spill_free(compile_main(plan)[0])
    assert WGTileConfig(bn=64, stages=2, lpt=40).label == "n64s2l40"
    with pytest.raises(ValueError, match="lpt"):
        WGTileConfig(bn=64, stages=2, lpt=-1)
