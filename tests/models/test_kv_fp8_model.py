"""A whole model over an FP8 (e4m3) KV cache, on the CPU: from_pretrained(kv_dtype=...) builds
caches of that storage, every layer attends with its own scales, and the logits stay within
e4m3's error of the same model over a bf16 cache."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf

from .hf_tiny import make_tiny

pytest.importorskip("transformers")


@pytest.mark.parametrize("scales", ["per_tensor", "per_head"])
def test_fp8_cache_model_tracks_the_bf16_cache_model(tmp_path, scales):
    make_tiny("llama", tmp_path, head_dim=16)
    bf16 = lf.from_pretrained(tmp_path, dtype=torch.bfloat16)
    fp8 = lf.from_pretrained(tmp_path, dtype=torch.bfloat16, kv_dtype="fp8_e4m3", kv_scales=scales)
    cache = fp8.make_cache(num_pages=4, max_seqs=2, max_pages_per_seq=2)
    assert cache.kv_dtype == "fp8_e4m3" and cache.scales == scales and cache.num_layers == 2
    assert cache.layer(1)[0].dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    a, b = bf16(ids).double(), fp8(ids).double()
    assert not b.isnan().any()
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < 2 ** -4, err   # the fp8 cache is read (not the bf16 path), within e4m3's step


def test_a_layers_scales_reach_its_attention(tmp_path):
    """Doubling one layer's V scale after a prompt is stored doubles what that layer's attention
    reads for the same prompt: the next step's logits move (the scales are read at each call)."""
    make_tiny("llama", tmp_path, head_dim=16)
    model = lf.from_pretrained(tmp_path, dtype=torch.bfloat16, kv_dtype="fp8_e4m3")
    cache = model.make_cache(num_pages=4, max_seqs=1, max_pages_per_seq=2)
    cache.allocate(0, 8)
    ids = torch.randint(0, 96, (7,), generator=torch.Generator().manual_seed(4))
    model.step(ids, [0] * 7, cache)
    before = model.step(ids[:1], [0], cache).double()
    cache.free(0)
    cache.allocate(0, 8)
    model.step(ids, [0] * 7, cache)
    cache.set_scales(1, 1.0, 2.0)
    after = model.step(ids[:1], [0], cache).double()
    assert not torch.allclose(before, after)
