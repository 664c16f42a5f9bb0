"""The persistent wgmma prefill (WGTileConfig.persist, the template's PERSIST): at most one CTA an SM, each taking row
blocks from a work queue. The kernel's own lines are cut from the rendered source and run on the host (a C++
compiler): the queue's places map to the launch order's (chunk, row block, z) exactly as the non-persistent grid's
CTAs find theirs (sectioned where lpt is taken, else the default order); the take loop, run by host threads standing
in for the CTAs, hands every row block with rows to exactly one CTA, none without rows, each CTA exactly one place
past the last, and leaves the counter at zero for the next launch. The planner takes it where it compiles without
spills, and the runtime launches it with the grid's sizes, the SM count and its counter (no GPU needed)."""
import dataclasses
import functools
import shutil
import subprocess

import pytest
import torch

import layerforge as lf
from layerforge.codegen import attention_wgmma as aw
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention, tile_candidates

from .test_attention_compile import ATTENTION, specialise
from .test_attention_wgmma_compile import assert_spill_free, compile_main, resources
from .test_attention_wgmma_lpt import GRIDS, expected, places_of

CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler to run the kernel's lines")

ORDER = """#include <algorithm>
#include <cstdio>
using std::min; using std::max;
constexpr int BM = %(BM)d, HD = %(HD)d, HDV = %(HDV)d, GROUP = %(GROUP)d;
int main() {
    unsigned x, y, z;
    while (std::scanf("%%u %%u %%u", &x, &y, &z) == 3) {
        constexpr int HKV = 1;   // z's places as splits of one KV head: any Z
        const int chunks = x, row_blocks = y, num_splits = z;
        auto lf_item_place = [&](int wi, int& chunk, int& level, int& zz) {
%(BODY)s
        };
        for (int wi = 0; wi < (int)(x * y * z); ++wi) {
            int chunk, level, zz;
            lf_item_place(wi, chunk, level, zz);
            std::printf("%%d %%d %%d\\n", chunk, level, zz);
        }
    }
}
"""

TAKE = """#include <atomic>
#include <cstdio>
#include <thread>
#include <vector>
std::atomic<int> counter{0};
int atomicAdd(int*, int v) { return counter.fetch_add(v); }
int atomicExch(int*, int v) { return counter.exchange(v); }
struct Dim { unsigned x; };
int main() {
    int total, grid, empty_every, launches;
    while (std::scanf("%%d %%d %%d %%d", &total, &grid, &empty_every, &launches) == 4) {
        for (int launch = 0; launch < launches; ++launch) {
            std::vector<std::vector<int>> took(grid);
            std::vector<std::thread> ctas;
            for (int cta = 0; cta < grid; ++cta) {
                ctas.emplace_back([&, cta] {
                    int* work = nullptr;
                    const Dim gridDim{(unsigned)grid};
                    // row blocks without rows: every empty_every-th place (0: none)
                    auto lf_item_live = [&](int w) { return empty_every == 0 || w %% empty_every != empty_every - 1; };
                    for (;;) {
%(BODY)s
                        took[cta].push_back(next);
                        if (next >= total) break;
                    }
                });
            }
            for (auto& t : ctas) t.join();
            for (int cta = 0; cta < grid; ++cta) {
                for (int w : took[cta]) std::printf("%%d ", w);
                std::printf("\\n");
            }
            std::printf("counter %%d\\n", counter.load());
        }
    }
}
"""


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def persistent(plan, lpt: int):
    return dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, persist=True, lpt=lpt))


def cut(src: str, start: str, end: str) -> str:
    """The source from the line holding `start` to the end of the line holding `end` (after it)."""
    i = src.rindex("\n", 0, src.index(start)) + 1
    j = src.index("\n", src.index(end, i)) + 1
    return src[i:j]


def build(tmp, name: str, text: str):
    (tmp / f"{name}.cpp").write_text(text)
    exe = tmp / name
    subprocess.run([CXX, "-std=c++17", "-O1", "-pthread", "-o", str(exe), str(tmp / f"{name}.cpp")], check=True)
    return exe


@functools.lru_cache(maxsize=None)
def host_order(plan, tmp):
    src = plan.source()
    body = cut(src, "const unsigned X = chunks, Y = row_blocks", "    };\n")
    body = body[:body.rindex("    };")]   # the lambda's body, without its close
    exe = build(tmp, f"order_{plan.config.label}", ORDER % dict(
        BM=plan.config.rows, HD=int(plan.spec.head_dim), HDV=int(plan.spec.v_head_dim), GROUP=plan.group, BODY=body))
    return places_of(exe)


@needs_cxx
@pytest.mark.parametrize("lpt", [0, 5, 40, aw.LPT_CTAS, 528])
@pytest.mark.parametrize("d,hq,hkv,consumers", [(128, 32, 8, 2), (256, 16, 16, 2), (64, 16, 16, 3)])
def test_queue_places_follow_the_launch_order(prog, tmp_path_factory, d, hq, hkv, consumers, lpt):
    """Place wi of the queue is the (chunk, level, z) that the non-persistent grid's wi-th CTA in launch order takes:
    the sectioned order at lpt > 0 (launch_order.longest_first), the default one at 0."""
    c = tile_candidates(d)[-1] if consumers == 2 and d == 64 else tile_candidates(d)[0]
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", hq, hkv, d),
                                tiles=WGTileConfig(bn=c.bn, stages=c.stages, consumers=consumers, persist=True, lpt=lpt))
    run = host_order(plan, tmp_path_factory.mktemp("queue_order"))
    for (x, y, z), got in zip(GRIDS, run(GRIDS)):
        assert got == expected(plan, x, y, z), (x, y, z)   # lpt 0: x * y >= 0, the default order


@needs_cxx
def test_take_loop_hands_out_every_live_row_block_once(prog, tmp_path_factory):
    """The producer's take loop, run by host threads as the CTAs (std::atomic for the counter): every place with rows
    is taken by exactly one CTA, in increasing order within a CTA; places without rows by none; each CTA stops at
    exactly one place >= total; the counter is zero after every launch, so the next launch starts from zero."""
    plan = persistent(plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, 128)), aw.LPT_CTAS)
    src = plan.source()
    body = cut(src, "int next;", "} while (next < total && !lf_item_live(next));")
    exe = build(tmp_path_factory.mktemp("queue_take"), "take", TAKE % dict(BODY=body))
    cases = [(1, 1, 0), (5, 1, 0), (5, 8, 0), (1000, 132, 0), (1000, 132, 3), (4096, 132, 7), (64, 132, 2),
             (3, 3, 1)]
    launches = 3
    out = subprocess.run([str(exe)], input="".join(f"{t} {g} {e} {launches}\n" for t, g, e in cases),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    lines = iter(out)
    for total, grid, every in cases:
        live = [w for w in range(total) if every == 0 or w % every != every - 1]
        for _ in range(launches):
            took = [list(map(int, next(lines).split())) for _ in range(grid)]
            assert next(lines) == "counter 0", (total, grid, every)
            assert all(t[-1] >= total and all(w < total for w in t[:-1]) for t in took), took
            assert all(t == sorted(t) for t in took)
            assert sorted(w for t in took for w in t[:-1]) == live, (total, grid, every)
            assert sorted(t[-1] for t in took) == list(range(total, total + grid))   # one failed take a CTA


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_persist_compiles_without_spills(prog, name, d):
    """Every stdlib block with the runtime's options and persist: the planner takes it (spill-free under NVRTC 13.0
    and the newest: the consumers' per-thread addresses are computed in each item, not hoisted out of the item loop),
    in the sectioned order, with each next row block's Q loaded early (label 'lqe'; persist alone where that spills),
    the queue's arguments and a grid of at most `sms` CTAs."""
    layer = specialise(prog, name, 32, 8, d)
    kw = dict(compile_fn=resources, overlap=True, tma=True, rope_step=True, fold=True, kv_rings=True,
              three_consumers=True, lpt=True)
    one = plan_wgmma_attention(layer, **kw)
    plan = plan_wgmma_attention(layer, persist=True, **kw)
    assert plan.config.persist, one.key
    assert plan.config == dataclasses.replace(one.config, persist=True, q_next=plan.config.q_next)
    if not plan.config.q_next:   # only where the early copies spill (T5's D64: three consumers beside its tables)
        early = dataclasses.replace(plan, tiles=dataclasses.replace(plan.config, q_next=True))
        kr = compile_main(early)[0]
        assert kr.spill_stores or kr.spill_loads, early.key
    assert plan.config.label.endswith("lqe" if plan.config.q_next else "lq")
    abi = plan.abi
    assert abi.problem == ("chunks", "max_q_len", "num_splits", "sms")
    assert [a.name for a in abi.args[-3:]] == ["chunks", "max_q_len", "work"] and abi.args[-1].role == "workspace"
    rb = f"cdiv(max_q_len * {plan.group}, {plan.config.rows})"
    assert abi.grid == (f"min(chunks * {rb} * {plan.spec.num_kv_heads} * num_splits, sms)", "1", "1")
    assert abi.grid_for(3, 1000, 2, 132)[0] == min(3 * -(-1000 * plan.group // plan.config.rows)
                                                   * int(plan.spec.num_kv_heads) * 2, 132)
    src = plan.source()
    assert src.count("for (;;) {") == 1 and "for (int nit = 0;; ++nit) {" in src and "for (int item" not in src
    assert "the next item reuses the stage" in src
    assert "LPT_CTAS" in src and "if (r0 >= n * GROUP) return;" not in src
    assert src.count("lf_prefetch_l2(row + off)") == 1   # the producer's L2 hint of the next row block's Q rows
    if plan.config.q_next:   # the first row block's Q copies at its start, each next one's after the tile loop
        assert src.count("for (int c = wt; c < 64 * CPR; c += 128)") == 2 and "if (nit == 0) {" in src
        assert src.index("every S of this warpgroup is in") < src.index("the last tile's O += P V: one more turn")
    assert_spill_free(compile_main(plan)[0])


def test_persist_is_its_own_variant(prog):
    """persist=False renders as before (no queue); the label and the checks of the tile configuration."""
    layer = specialise(prog, "llama_attn", 32, 8, 128)
    plain = plan_wgmma_attention(layer)
    assert "lf_item_place" not in plain.source() and plain.abi.problem == ("chunks", "max_q_len", "num_splits")
    assert WGTileConfig(bn=128, stages=3, persist=True).label == "n128s3q"
    assert WGTileConfig(bn=128, stages=3, persist=True, q_next=True).label == "n128s3qe"
    with pytest.raises(ValueError, match="pairs"):
        WGTileConfig(bn=128, stages=3, persist=True, pairs=True)
    with pytest.raises(ValueError, match="needs persist"):
        WGTileConfig(bn=128, stages=3, q_next=True)
    assert "if (nit == 0)" not in persistent(plain, 0).source()   # persist alone: Q at each row block's start
    queued = persistent(plain, 0)
    assert queued.shared_bytes == plain.shared_bytes + 40   # the two slots and their four mbarriers, after the rest


def test_runtime_launches_the_queue(prog, monkeypatch):
    """PagedAttention's launch of a persistent prefill (no GPU: the kernel replaced by a recorder): the problem sizes
    end with the SM count, so the grid is min(places, SMs); the kernel gets chunks, max_q_len and the module's counter
    (zero, one a device, the same tensor every call); the split heuristic counts the queue's places as CTAs."""
    from layerforge.runtime.attention import PagedAttention

    from ..devices import record_tc_launches
    layer = specialise(prog, "llama_attn", 32, 8, 128)
    plan = persistent(plan_wgmma_attention(layer), aw.LPT_CTAS)
    attn = PagedAttention(layer, arch="sm_90")
    calls = record_tc_launches(monkeypatch, attn, plan)
    monkeypatch.setattr(attn, "_tensor_maps", lambda *a: dict(k_map="k_map", v_map="v_map"))
    dev = torch.device("cpu")
    q = torch.zeros(3000, 32, 128, dtype=torch.bfloat16)
    cache = torch.zeros(200, 16, 8, 128, dtype=torch.bfloat16)
    for chunks, max_q_len in ((2, 1500), (1, 100)):
        calls.clear()
        attn._launch_tc(dev, "prefill", q, cache, cache, "page_table", "seq_lens", "cu_q", None, None, "out",
                        chunks, 200, chunks, max_q_len, max_q_len, 1, {})
        (problem, grid, args), = calls
        places = chunks * -(-max_q_len * 4 // 128) * 8
        assert problem == (chunks, max_q_len, 1, 132) and grid == (min(places, 132), 1, 1)
        assert (args["chunks"], args["max_q_len"], args["num_splits"]) == (chunks, max_q_len, 1)
        work = args["work"]
        assert work.dtype == torch.int32 and work.shape == (1,) and int(work[0]) == 0
        assert work is attn._work_counter(dev)


@pytest.mark.parametrize("name", ["doc_causal", "doc"])
@pytest.mark.parametrize("d", [64, 128])
def test_persist_over_block_mask_lists(name, d):
    """A mask over tables (packed documents: the wgmma kernel walks the block-mask pre-pass's lists): the persistent
    kernel is taken, where the producer's 40 registers are one short with 8 more for it and 8 fewer for each consumer
    (label g48x224); spill-free, with Q early. The mask tested per score (mask_bits=False); with its test as bits (the
    default) the persistent kernel is taken at D128, and at D64 (three consumers of 160 registers) the planner keeps
    a spill-free plan, persistent or not (it spills there as written)."""
    from ..gpu.test_block_mask import SRC
    layer = lf.loads(SRC, "block_masks.lf", with_stdlib=False).specialise(name, Hq=32, Hkv=8, D=d, dtype="bf16")
    kw = dict(compile_fn=resources, overlap=True, tma=True, rope_step=True, fold=True, kv_rings=True,
              three_consumers=True, lpt=True, page_size=64)
    one = plan_wgmma_attention(layer, mask_bits=False, **kw)
    plan = plan_wgmma_attention(layer, persist=True, mask_bits=False, **kw)
    assert one.block_mask and plan.block_mask and plan.config.persist and plan.config.q_next, plan.key
    regs = (plan.config.producer_regs, plan.config.consumer_regs)
    assert regs in (one.config.default_regs, (48, 224)) and ("g48x224" in plan.config.label) == (regs == (48, 224))
    assert_spill_free(compile_main(plan)[0])
    bits = plan_wgmma_attention(layer, persist=True, **kw)
    assert bits.mask_split and (bits.config.persist or d == 64), bits.key
    assert_spill_free(compile_main(bits)[0])
    assert WGTileConfig(bn=128, stages=3, producer_regs=48, consumer_regs=224).label == "n128s3g48x224"
