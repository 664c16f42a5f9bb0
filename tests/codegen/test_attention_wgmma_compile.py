"""The Hopper (wgmma) prefill kernel renders and compiles for sm_90a without register spills,
for every stdlib attention block, head dims 64/128/256, bf16 and f16, GQA ratios, pages of 16
and 64, and the mask-tile / sink / table hooks (no GPU needed)."""
import pytest

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, plan_wgmma_attention, supports, tile_candidates
from layerforge.codegen.row import LoweringError

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")
ATTENTION = ["llama_attn", "mistral_attn", "bert_attn", "gemma2_attn", "bloom_attn", "gpt2_attn", "t5_attn"]


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def specialise(prog, name, hq, hkv, d, dtype="bf16"):
    kw = dict(Hq=hq, Hkv=hkv, D=d)
    if name == "t5_attn":
        kw["NB"] = 32
    return prog.specialise(name, dtype=dtype, **kw)


def compile_main(plan):
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90a"))
    assert set(res.resources) == {plan.kernel_name, plan.merge_name}
    for code in ("C7508", "C7510", "C7515"):   # setmaxnreg ignored, wgmma serialised
        assert code not in res.log, res.log
    return res.resources[plan.kernel_name], res


def assert_spill_free(kr):
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, kr


def resources(plan):
    return nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch)).resources


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("name", ATTENTION)
def test_wgmma_prefill_compiles_without_spills(prog, name, d):
    """The planner's choice (the first tile candidate without spills, as the runtime plans)."""
    plan = plan_wgmma_attention(specialise(prog, name, 32, 8, d), compile_fn=resources)
    assert plan.arch == "sm_90a" and plan.key.endswith("_sm90a")
    kr, res = compile_main(plan)
    assert_spill_free(kr)
    assert kr.registers * plan.config.threads <= 65536   # the register cap at launch: one CTA per SM


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("page", [4, 16, 64, 256])
def test_gqa_pages_and_dtypes_compile(prog, hq, hkv, page, dtype):
    plan = plan_wgmma_attention(specialise(prog, "gemma2_attn", hq, hkv, 128, dtype), page_size=page)
    assert_spill_free(compile_main(plan)[0])


CANDIDATES = [(d, c) for d in (64, 128, 256) for c in tile_candidates(d)]


@pytest.mark.parametrize("d,tiles", CANDIDATES, ids=lambda x: getattr(x, "label", str(x)))
def test_every_tile_candidate_compiles(prog, d, tiles):
    plan = plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, d), tiles=tiles)
    assert_spill_free(compile_main(plan)[0])
    assert plan.shared_bytes <= 227 * 1024


@pytest.mark.parametrize("name", ["prefix_lm", "sinks", "dilated", "natten", "by_head", "prefix_table", "head_window"])
def test_block_sparse_masks_compile(name):
    from ..codegen.test_mask_tiles import MASKS
    prog = lf.loads(MASKS, "masks.lf", with_stdlib=False)
    layer = prog.specialise(name, Hq=8, Hkv=2, D=128, dtype="bf16")
    src = plan_wgmma_attention(layer).source()
    # the producer and the consumers skip the same tiles (dilated: no tile is empty or full, no classifier)
    assert ("if (LF_TILE(k0) == 0) continue;" in src) == ("const int tile_cls = LF_TILE(k0);" in src) == (name != "dilated")
    assert_spill_free(compile_main(plan_wgmma_attention(layer))[0])


def test_sinks_compile():
    from ..dsl.test_attention_sinks import SINKS
    prog = lf.loads(SINKS, "sinks.lf", with_stdlib=False)
    plan = plan_wgmma_attention(prog.specialise("sink_attn", Hq=8, Hkv=2, D=128, dtype="bf16", window=40))
    assert "lf_sink(" in plan.source()
    assert_spill_free(compile_main(plan)[0])


def test_kernel_uses_the_hopper_instructions(prog):
    src = plan_wgmma_attention(specialise(prog, "llama_attn", 32, 8, 128)).source()
    for needle in ("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16", "setmaxnreg.inc", "setmaxnreg.dec",
                   "mbarrier.try_wait.parity", "fence.proxy.async"):
        assert needle in src, needle


def test_what_it_does_not_serve(prog):
    with pytest.raises(LoweringError, match="head dim 96"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 96))
    with pytest.raises(LoweringError, match="f32"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 64, "f32"))
    with pytest.raises(LoweringError, match="pages of at least"):
        plan_wgmma_attention(specialise(prog, "llama_attn", 8, 8, 128), page_size=2)
    assert not supports(specialise(prog, "llama_attn", 8, 8, 128), 2)
    assert supports(specialise(prog, "llama_attn", 8, 8, 128), 16)
    with pytest.raises(ValueError, match="64K"):
        WGTileConfig(bn=128, stages=2, producer_regs=64, consumer_regs=240)
