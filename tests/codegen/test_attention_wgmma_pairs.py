"""The wgmma prefill with two row blocks a CTA (WGTileConfig.pairs, the template's ITEMS = 2): the kernel's lines that
give a CTA its row blocks, cut from the rendered source and run on the host (a C++ compiler), cover every row block of
every chunk exactly once over the grid's cdiv(row blocks, 2) CTAs, the longer first; the kernels compile for sm_90a
without spills; the ring's places carry from one item to the next and the last tile's stage is handed back; one row
block a CTA renders as before (no GPU needed)."""
import dataclasses
import functools
import shutil
import subprocess

import pytest

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention, tile_candidates

from .test_attention_compile import ATTENTION, specialise
from .test_attention_wgmma_compile import assert_spill_free, compile_main, resources

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
HOST = """#include <cstdio>
constexpr int BM = %(BM)d, GROUP = %(GROUP)d;
struct Dim { unsigned x, y, z; };
int main() {
    int n, ymax;
    while (std::scanf("%%d %%d", &n, &ymax) == 2) {
        for (unsigned by = 0; by < (unsigned)(ymax + 1) / 2; ++by) {
            const Dim blockIdx{0, by, 0};
            for (int item = 0; item < 2; ++item) {
%(BODY)s
                std::printf("%%u %%d %%d\\n", by, item, r0);
            }
        }
        std::printf("end\\n");
    }
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def pair(tiles: WGTileConfig) -> WGTileConfig:
    return dataclasses.replace(tiles, pairs=True)


@functools.lru_cache(maxsize=None)
def host_pairs(plan, tmp):
    src = plan.source()
    start = src.index("    const int y_cta")
    body = src[start:src.index("\n", src.index("const int r0", start)) + 1]
    (tmp / "pairs.cpp").write_text(HOST % dict(BM=plan.config.rows, GROUP=plan.group, BODY=body))
    exe = tmp / "pairs"
    subprocess.run([CXX, "-std=c++17", "-O1", "-o", str(exe), str(tmp / "pairs.cpp")], check=True)

    def run(cases):
        out = subprocess.run([str(exe)], input="".join(f"{n} {y}\n" for n, y in cases), capture_output=True, text=True,
                             check=True).stdout.split("end\n")
        return [[tuple(map(int, line.split())) for line in part.splitlines()] for part in out[:len(cases)]]
    return run


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler to run the kernel's lines")
@pytest.mark.parametrize("hq,hkv,d", [(16, 16, 128), (32, 8, 128), (24, 8, 64)])
def test_every_row_block_once_longer_first(prog, tmp_path_factory, hq, hkv, d):
    c = tile_candidates(d)[-1] if d == 64 else tile_candidates(d)[0]   # D64: two consumers (128 rows)
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", hq, hkv, d), tiles=pair(
        WGTileConfig(bn=c.bn, stages=c.stages)))
    run = host_pairs(plan, tmp_path_factory.mktemp("pairs"))
    g, bm = plan.group, plan.config.rows
    cases = []
    for ymax in (1, 2, 3, 7, 8, 32, 33):
        for n in sorted({1, 5, bm // g, bm // g + 1, ymax * bm // g, (ymax * bm - 1) // g + 1, ymax * bm // g - 3}):
            if 0 < n and -(-n * g // bm) <= ymax:
                cases.append((n, ymax))
    for (n, ymax), got in zip(cases, run(cases)):
        yc = -(-n * g // bm)
        blocks = sorted(r0 // bm for _, _, r0 in got)
        assert blocks == list(range(yc)), (n, ymax, got)
        for y in range(-(-ymax // 2)):
            mine = [(item, r0 // bm) for by, item, r0 in got if by == y]
            assert [i for i, _ in mine] == sorted(i for i, _ in mine) and len(mine) <= 2
            if len(mine) == 2:   # the longer first, then the shorter: their sum is the chunk's row blocks - 1
                assert mine[0][1] > mine[1][1] and mine[0][1] + mine[1][1] == yc - 1


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_pairs_compile_without_spills(prog, name, d):
    """Every stdlib block with the runtime's options and two row blocks a CTA: spill-free where the planner takes it;
    where the paired kernel spills, the plan is the one-block plan unchanged (D64's three consumers: the producer's 32
    registers; under NVRTC 13.0 also gemma2's D256 overlap with rings)."""
    layer = specialise(prog, name, 32, 8, d)
    kw = dict(compile_fn=resources, overlap=True, tma=True, rope_step=True, fold=True, kv_rings=True,
              three_consumers=True, lpt=True)
    one = plan_wgmma_attention(layer, **kw)
    plan = plan_wgmma_attention(layer, pairs=True, **kw)
    if not plan.config.pairs:
        assert plan == one
        assert one.config.consumers == 3 or (d == 256 and name == "gemma2_attn"), one.key
        return
    assert plan.config == dataclasses.replace(one.config, pairs=True, lpt=0) and plan.config.label.endswith("p")
    src = plan.source()
    assert src.count("for (int item = 0; item < 2; ++item)") == 2 and "LPT_CTAS" not in src
    assert "the next item reuses the stage" in src
    assert plan.abi.grid[1] == f"cdiv(cdiv(max_q_len * {plan.group}, {plan.config.rows}), 2)"
    assert_spill_free(compile_main(plan)[0])


def test_pairs_off_renders_as_before(prog):
    """pairs=False: no item loop, the ring's places and the early return as before."""
    layer = specialise(prog, "llama_attn", 32, 8, 128)
    plan = plan_wgmma_attention(layer)
    src = plan.source()
    assert "for (int item" not in src and "if (r0 >= n * GROUP) return;" in src and "y_cta" not in src
    assert plan.abi.grid[1] == "cdiv(max_q_len * 4, 128)"


ROPE_BLOCKS = """
attention gptj_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    rope(theta = 10000.0, style = gptj)
    mask = q_pos >= kv_pos
}
attention partial_attn(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D]) -> T[B, S, Hq, D] {
    rope(theta = 10000.0, style = neox, dim = 32)
    mask = q_pos >= kv_pos
}
"""


@pytest.mark.parametrize("name,hq,hkv,d", [("llama_attn", 32, 8, 128), ("llama_attn", 32, 32, 128),
                                           ("llama_attn", 24, 8, 128), ("llama_attn", 32, 8, 64),
                                           ("llama_attn", 16, 2, 256), ("gptj_attn", 32, 8, 128),
                                           ("partial_attn", 32, 8, 128)])
def test_rope_batch_compiles(prog, name, hq, hkv, d):
    """q's rotation with every pair read before any store (WGTileConfig.rope_batch): the planner takes it with
    rope_step where spill-free; neox pairs (whole or partial rotary) in 16-byte runs of 8 pairs, gptj's pair by
    pair; the reads come first in the kernel's source; no spills (GQA 1 / 3 / 4 / 8)."""
    from layerforge.codegen.attention_wgmma import rope_runs
    from layerforge.codegen.attention import hook_context
    src_prog = prog if name == "llama_attn" else lf.loads(ROPE_BLOCKS, "rope_blocks.lf")
    layer = specialise(src_prog, name, hq, hkv, d)
    kw = dict(compile_fn=resources, overlap=True, tma=True, rope_step=True, fold=True, kv_rings=True,
              three_consumers=True, lpt=True)
    plan = plan_wgmma_attention(layer, rope_batch=True, **kw)
    assert plan.config.rope_batch and plan.config.rope_step and plan.config.label.endswith("b")
    src = plan.source()
    assert not plan.config.rope_regs and "ROPE_REGS" not in src
    if rope_runs(hook_context(layer)):
        assert name != "gptj_attn"
        rope = src[src.index("uint4 xa[GROUP], xb[GROUP];"):]
        assert rope.index("xa[g] = *reinterpret_cast<const uint4*>") < rope.index("lf_rope_rotated_lo(x1, x2")
        # rope_regs (label i): the rotated columns from global memory into registers, every load before the angles
        # and the first rotation; the cp.async copies skip them, and no copy is waited for before the rotation
        regs = plan_wgmma_attention(layer, rope_batch=True, rope_regs=True, **kw)
        assert regs.config == dataclasses.replace(plan.config, rope_regs=True) and regs.key.count("bi") == 1
        src = regs.source()
        rope = src[src.index("uint4 xa[KT][GROUP], xb[KT][GROUP];"):]
        assert rope.index("xa[k][g] = __ldg(") < rope.index("xb[k][g] = __ldg(") < rope.index("lf_rope_sincos(")
        assert rope.index("lf_rope_sincos(") < rope.index("lf_rope_rotated_lo(x1, x2")
        assert "if (ch < LF_ROPE_PAIRS / 4 && ok) continue;" in src
        head = src[:src.index("uint4 xa[KT][GROUP], xb[KT][GROUP];")]
        assert "lf_cp_wait<0>();" not in head[head.rindex("lf_setmaxnreg_inc"):]
        assert_spill_free(compile_main(regs)[0])
    else:
        assert name == "gptj_attn"
        rope = src[src.index("xa[KT][GROUP]"):]
        assert rope.index("xa[k][g] = *") < rope.index("lf_rope_rotated_lo(x1, x2, sn, cs)")
    assert_spill_free(compile_main(plan)[0])
    plain = plan_wgmma_attention(specialise(prog, "gpt2_attn", hq, hkv, d), rope_batch=True, rope_regs=True, **kw)
    assert not plain.config.rope_batch and not plain.config.rope_regs   # no RoPE: nothing to batch
    with pytest.raises(ValueError, match="rope_regs is a form of rope_batch"):
        WGTileConfig(bn=128, stages=3, rope_regs=True)
    with pytest.raises(ValueError, match="rope_regs is a form of rope_batch"):
        WGTileConfig(bn=128, stages=3, rope_step=True, rope_batch=True, persist=True, q_next=True, rope_regs=True)
