"""CogVLM's visual-expert attention on the GPU (generated rope row kernel, paged prefill and decode
kernels, cuBLAS per-expert projections) against the float64 implementation of the published
attention: mixed image/text batches with padding, GQA, prefill then decode steps."""
from __future__ import annotations

import pytest
import torch

from layerforge.runtime.cogvlm import CogVLMAttention, expert_mask, position_ids

from ..cogvlm_ref import ref_attention, random_state

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def _module(H, heads, kv_heads, dtype, bias=False):
    m = CogVLMAttention({"hidden_size": H, "num_attention_heads": heads, "num_multi_query_heads": kv_heads,
                         "vision_qkv_bias": bias}, dtype=dtype, page_size=16)
    sd = random_state(H, heads, kv_heads, vision_bias=bias, seed=3)
    m.load_state_dict(sd)
    return m.to("cuda", DTYPES[dtype]), sd


def _types(B, L, gen):
    """Each row: text, then an image run of random length and place, then text."""
    t = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(torch.randint(3, L // 2, (1,), generator=gen))
        s = int(torch.randint(1, L - n, (1,), generator=gen))
        t[b, s:s + n] = 1
    return t


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("heads,kv_heads,D,bias", [(8, 8, 64, False), (8, 2, 128, True)])
def test_dense_batch_matches_float64(dtype, heads, kv_heads, D, bias):
    gen = torch.Generator().manual_seed(7)
    H, B, L = heads * D, 3, 300
    m, sd = _module(H, heads, kv_heads, dtype, bias)
    types = _types(B, L, gen)
    keep = torch.ones(B, L, dtype=torch.long)
    keep[1, :37] = 0                                   # left padding
    x = torch.randn(B, L, H, generator=gen)
    got = m.attend_dense(x.to("cuda", DTYPES[dtype]), types, keep)
    torch.cuda.synchronize()
    want = ref_attention(sd, x.to(DTYPES[dtype]).double(), types, keep, heads=heads, kv_heads=kv_heads)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
    assert (got[1, :37] == 0).all()


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_prefill_then_decode_steps(dtype):
    gen = torch.Generator().manual_seed(8)
    H, heads, L, steps = 512, 8, 200, 16
    m, sd = _module(H, heads, heads, dtype)
    types = _types(2, L + steps, gen)
    types[:, L:] = 0
    x = torch.randn(2, L + steps, H, generator=gen)
    want = ref_attention(sd, x.to(DTYPES[dtype]).double(), types, None, heads=heads, kv_heads=heads)
    pos, vis = position_ids(types), expert_mask(types)
    xc = x.to("cuda", DTYPES[dtype])
    cache = m.make_cache(num_pages=64, max_seqs=2, max_pages_per_seq=32)
    for s in (0, 1):
        cache.allocate(s, L + steps)
    got = torch.full((2, L + steps, H), float("nan"), dtype=DTYPES[dtype], device="cuda")
    got[:, :L] = m(xc[:, :L].reshape(2 * L, H), seq_ids=[0] * L + [1] * L, vision=vis[:, :L].reshape(-1),
                   positions=pos[:, :L].reshape(-1), cache=cache).view(2, L, H)
    for t in range(L, L + steps):
        got[:, t] = m(xc[:, t], seq_ids=[0, 1], vision=[False, False], positions=pos[:, t], cache=cache)
    torch.cuda.synchronize()
    assert not got.isnan().any()
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
