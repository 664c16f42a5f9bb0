"""The tensor-core attention kernel at head dims off 64/128/256 (80, 96, 160, 192: the padded
kernels of codegen/attention_tc.py) and with a value head dim of its own (DeepSeek's MLA
prefill: q/k 192, values 128), against the reference evaluator in float64. Every case goes
through tests/gpu/test_paged_attention.py's run_case: the output is poisoned with NaN first
(NaN never passes), the relative error must stay under 2e-2 (bf16), and a row the mask hides
entirely must give zeros. Lengths are not multiples of a tile or a page; pages of 16 and 64."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.attention import PagedAttention

from ..codegen.test_attention_tc_dims import NEW_DIMS, VALUE_DIM_BLOCKS
from .test_paged_attention import run_case as _run_case


def run_case(*args, **kw):
    """The mma.sync kernels' cases: their prefill asked for (the sm_90 default is the wgmma kernel,
    tests/gpu/test_attention_wgmma_dims.py)."""
    return _run_case(*args, prefill="tc", **kw)


def hopper():
    return torch.cuda.get_device_capability() == (9, 0)


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


@pytest.fixture(scope="module")
def mla():
    return lf.loads(VALUE_DIM_BLOCKS, "mla.lf")


@pytest.fixture(params=["tc", "tc-ragged"])
def form(request):
    return request.param


@pytest.mark.parametrize("d", NEW_DIMS)
def test_new_head_dims_run_on_tensor_cores_by_default(prog, d):
    """The default module takes the tensor-core kernels (the wgmma prefill on Hopper)."""
    attn = PagedAttention(prog.specialise("llama_attn", Hq=32, Hkv=8, D=d, dtype="bf16"))
    assert attn.kernel == "tc" and attn.prefill_kernel == ("wgmma" if hopper() else "tc")


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d", NEW_DIMS)
def test_decode_new_head_dims(prog, form, d, page):
    """Decode tiles: single tokens and a 3-token chunk (its 12 rows fit one m16 tile), lengths 1
    up to past a few key tiles."""
    run_case(prog, form, "llama_attn", 32, 8, d, page, lens=[1, 17, 100, 300], new=[1, 1, 3, 1])


@pytest.mark.parametrize("d", NEW_DIMS)
@pytest.mark.parametrize("name", ["llama_attn", "mistral_attn", "gemma2_attn", "bloom_attn"])
def test_prefill_new_head_dims(prog, name, d):
    """Prefill tiles over whole prompts and a chunk over a cached prefix: causal + RoPE, a
    sliding window, soft-capping + window, ALiBi."""
    consts = {"window": 200} if name in ("mistral_attn", "gemma2_attn") else {}
    run_case(prog, "tc-ragged", name, 16, 4, d, 16, lens=[700, 1, 333, 900], new=[700, 1, 333, 77], **consts)


@pytest.mark.parametrize("d", [96, 192])
def test_prefill_new_head_dims_pages_of_64(prog, d):
    run_case(prog, "tc-ragged", "gemma2_attn", 16, 4, d, 64, lens=[1000, 257, 65], new=[1000, 3, 65], window=300)


@pytest.mark.parametrize("hq,hkv", [(8, 8), (32, 4), (32, 1)])
@pytest.mark.parametrize("d", [80, 96, 160, 192])
def test_gqa_ratios_new_head_dims(prog, form, hq, hkv, d):
    run_case(prog, form, "llama_attn", hq, hkv, d, 16, lens=[5, 33, 70], new=[5, 3, 1])


@pytest.mark.parametrize("d", NEW_DIMS)
def test_fully_masked_rows_new_head_dims(prog, form, d):
    """bert_attn with kv_len 0 for one sequence: its rows see no key and must be zeros."""
    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 20][:nseq], dtype=torch.int32).cuda()}
    run_case(prog, form, "bert_attn", 8, 8, d, 16, lens=[10, 10, 20], new=[10, 10, 20], extra_fn=extra)


@pytest.mark.parametrize("d", [96, 192])
def test_split_kv_new_head_dims(prog, form, d):
    """Long contexts split over the keys (automatically, and 7 parts): the merge kernel of the
    padded kernels."""
    run_case(prog, form, "llama_attn", 32, 8, d, 64, lens=[4096, 1365], new=[1, 1])
    run_case(prog, form, "llama_attn", 32, 8, d, 64, lens=[4096], new=[1], splits=7)
    run_case(prog, "tc-ragged", "llama_attn", 8, 8, d, 64, lens=[4096], new=[20], splits=5)


def test_f16_new_head_dim(prog, form):
    run_case(prog, form, "gemma2_attn", 16, 8, 96, 16, lens=[300, 90], new=[300, 40], dtype=torch.float16, window=64)


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("d,dv", [(192, 128), (128, 64), (96, 64)])
def test_value_dim_of_its_own(mla, form, d, dv, page):
    """Dv != D (MLA prefill: 192 / 128): S over D, O = P V over Dv, decode and prefill tiles."""
    attn = PagedAttention(mla.specialise("mla_attn", Hq=16, Hkv=16, D=d, Dv=dv, dtype="bf16"))
    assert attn.kernel == "tc" and attn.prefill_kernel == ("wgmma" if hopper() else "tc") and attn.dv == dv
    run_case(mla, form, "mla_attn", 16, 16, d, page, lens=[700, 1, 333, 90], new=[700, 1, 333, 7], dv=dv)
    run_case(mla, form, "mla_attn", 16, 4, d, page, lens=[300, 41], new=[1, 1], dv=dv, softcap=30.0)


def test_value_dim_split_kv_and_masked_rows(mla, form):
    def extra(nseq, gen):
        return {"kv_len": torch.tensor([3, 0, 2000][:nseq], dtype=torch.int32).cuda()}
    run_case(mla, form, "mla_pad_attn", 16, 16, 192, 16, lens=[10, 10, 3000], new=[10, 10, 20], dv=128,
             extra_fn=extra)
    run_case(mla, form, "mla_attn", 16, 16, 192, 64, lens=[4096], new=[20], dv=128, splits=5)
