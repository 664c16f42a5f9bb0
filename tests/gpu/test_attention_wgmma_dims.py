"""The Hopper (wgmma) prefill kernel at head dims off 64/128/256 and with a value head dim of its
own, against the reference evaluator in float64 (tests/gpu/test_paged_attention.py's run_case:
fresh random inputs, the output NaN-filled first, NaN fails, relative error under 2e-2, fully
masked rows zeros). Head dims 80, 96, 160, 192 (and every multiple of 16 the layouts differ on),
DeepSeek's MLA prefill (q/k 192, values 128) and 128/64, 96/64; each in the native swizzle of
its head dims (32 / 64 bytes where 128 does not divide them) and in 128-byte rows padded
("w128"), under the plain and the overlap schedule; ragged sequences, chunks over a cached
prefix, pages of 16 and 64, split-KV, GQA, f16. Runs only on sm_90 GPUs."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.attention_wgmma import WGTileConfig, native_swizzle, tile_candidates
from layerforge.runtime.attention import PagedAttention
from layerforge.runtime.mla import MLA_PREFILL_SOURCE

from .test_attention_dims import mla, prog  # noqa: F401 - the stdlib and the value-dim blocks (module fixtures)
from .test_paged_attention import run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="the wgmma prefill kernel runs on sm_90 GPUs (H100, H200) only")
LONG = dict(lens=[700, 1, 333, 900], new=[700, 1, 333, 77])   # whole prompts, a length-1 one, a chunk
DIMS = [80, 96, 160, 192]


@pytest.fixture(autouse=True, params=["plain", "overlap"])
def schedule(request, monkeypatch):
    monkeypatch.setenv("LAYERFORGE_WGMMA_OVERLAP", "1" if request.param == "overlap" else "0")
    return request.param


@pytest.fixture(params=["native", "w128"])
def swizzle(request):
    """0: the kernel's own choice (the widest swizzle dividing the head dims); 128: rows padded to
    whole 128-byte lines (the padding never loaded, O's padded columns never stored)."""
    return 0 if request.param == "native" else 128


def tiles_for(d, dv, swizzle):
    """swizzle 128: the first tile shape of the padded dims (their rows are wider)."""
    pad = lambda x: -(-x // 64) * 64  # noqa: E731
    c = tile_candidates(pad(d), pad(dv))[0]
    return {"prefill": WGTileConfig(bn=c.bn, stages=c.stages, swizzle=swizzle)} if swizzle else None


def wgmma(prog, name, hq, hkv, d, page, swizzle=0, dv=None, **kw):
    run_case(prog, "tc-ragged", name, hq, hkv, d, page, prefill="wgmma", dv=dv,
             tiles=tiles_for(d, dv or d, swizzle), **kw)


def test_swizzles_and_tiles_of_the_new_dims():
    assert [native_swizzle(d, d) for d in (64, 80, 96, 128, 160, 192, 256)] == [128, 32, 64, 128, 64, 128, 128]
    assert native_swizzle(192, 128) == 128 and native_swizzle(96, 64) == 64
    for d, dv in [(80, 80), (96, 96), (160, 160), (192, 192), (192, 128)]:
        assert tile_candidates(d, dv)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("name", ["llama_attn", "gemma2_attn", "bloom_attn"])
def test_variants_new_head_dims(prog, swizzle, name, d, page):
    """Causal + RoPE + GQA, soft-cap + window, ALiBi; whole prompts and a chunk over a prefix."""
    consts = {"window": 200} if name == "gemma2_attn" else {}
    wgmma(prog, name, 16, 4, d, page, swizzle, **LONG, **consts)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 1)])
def test_gqa_new_head_dims(prog, d, hq, hkv):
    wgmma(prog, "llama_attn", hq, hkv, d, 16, lens=[5, 33, 70, 300], new=[5, 3, 70, 129])


@pytest.mark.parametrize("d", [48, 112, 144, 176, 208, 224, 240])
def test_other_multiples_of_16(prog, d):
    """Layouts of 32-byte (48, 112, 144, 176, 208, 240) and 64-byte (224) swizzles."""
    wgmma(prog, "llama_attn", 16, 4, d, 16, lens=[300, 129], new=[300, 64])


@pytest.mark.parametrize("d", DIMS)
def test_every_tile_candidate(prog, d):
    for i in range(len(tile_candidates(d, d))):
        c = tile_candidates(d, d)[i]
        run_case(prog, "tc-ragged", "mistral_attn", 16, 4, d, 16, prefill="wgmma", window=150,
                 tiles={"prefill": c}, lens=[500, 260], new=[500, 30])


@pytest.mark.parametrize("d", [96, 192])
def test_split_kv_and_f16(prog, d):
    wgmma(prog, "llama_attn", 8, 8, d, 64, lens=[4096], new=[200], splits=5)
    wgmma(prog, "gemma2_attn", 16, 8, d, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16, window=64)


@pytest.mark.parametrize("d", [80, 160])
def test_fully_masked_rows(prog, d):
    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 20][:nseq], dtype=torch.int32).cuda()}
    wgmma(prog, "bert_attn", 8, 8, d, 16, lens=[100, 100, 200], new=[100, 100, 200], extra_fn=extra)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d,dv", [(192, 128), (128, 64), (96, 64)])
def test_value_dim_of_its_own(mla, swizzle, d, dv, page):
    """Dv != D (MLA prefill: 192 / 128): S over D, O = P V over Dv."""
    run_case(mla, "tc-ragged", "mla_attn", 16, 16, d, page, lens=[700, 1, 333, 90], new=[700, 1, 333, 60], dv=dv,
             prefill="wgmma", tiles=tiles_for(d, dv, swizzle))
    run_case(mla, "tc-ragged", "mla_attn", 16, 4, d, page, lens=[300, 41], new=[100, 41], dv=dv, softcap=30.0,
             prefill="wgmma", tiles=tiles_for(d, dv, swizzle))


def test_value_dim_split_kv_and_masked_rows(mla):
    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 2000][:nseq], dtype=torch.int32).cuda()}
    run_case(mla, "tc-ragged", "mla_pad_attn", 16, 16, 192, 16, lens=[40, 40, 3000], new=[40, 40, 200], dv=128,
             extra_fn=extra, prefill="wgmma")
    run_case(mla, "tc-ragged", "mla_attn", 16, 16, 192, 64, lens=[4096], new=[200], dv=128, splits=5,
             prefill="wgmma")


def test_mla_prefill_block_on_its_default_kernel():
    """The MLA layer's prefill block (runtime/mla.py) at DeepSeek's dims: 128 heads, its softmax
    scale, a prompt and a chunk over a cached prefix."""
    prog = lf.loads(MLA_PREFILL_SOURCE, "mla_prefill.lf", with_stdlib=False)
    run_case(prog, "tc-ragged", "mla_prefill", 128, 128, 192, 64, lens=[600, 300], new=[600, 45], dv=128,
             softmax_scale=0.1147)
    layer = prog.specialise("mla_prefill", Hq=128, Hkv=128, D=192, Dv=128, dtype="bf16")
    assert PagedAttention(layer, page_size=64).prefill_kernel == "wgmma"   # the sm_90 default at 192 / 128
