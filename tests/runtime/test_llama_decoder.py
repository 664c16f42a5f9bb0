"""The Llama decoder layer (RMSNorm, add+RMSNorm, SwiGLU, paged attention) against
transformers' LlamaDecoderLayer, loaded from its state dict: a prefill of two ragged
sequences, then decode steps. On CUDA the generated kernels run; on the CPU the reference
evaluator behind the same modules. Head dim 64: the attention kernels specialise 64, 128
and 256."""
import pytest
import torch

from ..devices import DEVICES
from .hf_llama import causal_mask, check

transformers = pytest.importorskip("transformers")

TOL = 2e-2


def hf_layer_over(layer, rope, xs):
    """transformers' decoder layer over a whole sequence [1, L, H] (causal, no cache)."""
    L = xs.shape[1]
    pos = torch.arange(L, device=xs.device)[None]
    with torch.no_grad():
        out = layer(xs, attention_mask=causal_mask(xs), position_ids=pos, position_embeddings=rope(xs, pos))
    out = out[0] if isinstance(out, tuple) else out
    return out[0]


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_layer_matches_transformers(device):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from layerforge.runtime.llama_decoder import LlamaPagedDecoderLayer
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=640, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5,
                                   attn_implementation="eager", vocab_size=11, num_hidden_layers=1)
    hf = LlamaDecoderLayer(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "layernorm" in name else 0.08 * torch.randn_like(p))
    hf = hf.to(device).to(torch.bfloat16).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    ours = LlamaPagedDecoderLayer(cfg, page_size=16).to(device).to(torch.bfloat16)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    assert not missing and not unexpected
    assert set(ours.state_dict()) == set(hf.state_dict())        # saved under transformers' keys too
    cache = ours.make_cache(num_pages=32, max_seqs=2, max_pages_per_seq=8)
    lens = {0: 9, 1: 23}
    for s in lens:
        cache.allocate(s, 40)
    history = {s: torch.randn(n, cfg.hidden_size, device=device, dtype=torch.bfloat16) for s, n in lens.items()}
    y = ours(torch.cat([history[0], history[1]]), seq_ids=[0] * lens[0] + [1] * lens[1], cache=cache)
    want = torch.cat([hf_layer_over(hf, rope, history[s][None]) for s in (0, 1)])
    check(y, want, "prefill", TOL)
    for step in range(2):
        new = {s: torch.randn(1, cfg.hidden_size, device=device, dtype=torch.bfloat16) for s in lens}
        y = ours(torch.cat([new[0], new[1]]), seq_ids=[0, 1], cache=cache)
        for s in lens:
            history[s] = torch.cat([history[s], new[s]])
        want = torch.cat([hf_layer_over(hf, rope, history[s][None])[-1:] for s in (0, 1)])
        check(y, want, f"decode step {step}", TOL)
