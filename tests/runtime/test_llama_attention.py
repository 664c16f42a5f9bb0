"""The Llama attention layer built from the DSL, served from the paged cache, against
transformers' LlamaAttention (random small config, no download): a prefill of two ragged
sequences, several decode steps, a chunked-prefill step and a step with interleaved tokens.
On CUDA the generated kernels run; on the CPU the reference evaluator behind the same layer,
cache and append path."""
import pytest
import torch

from ..devices import DEVICES
from .hf_llama import causal_mask, check

transformers = pytest.importorskip("transformers")

# Llama 3.1's frequency scaling, with a short original context so that it matters at the
# positions of the test (wavelengths past 64 tokens are scaled)
LLAMA3_SHORT = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=64)
CASES = [pytest.param(8, 2, None, id="gqa"), pytest.param(4, 4, None, id="mha"),
         pytest.param(8, 2, LLAMA3_SHORT, id="gqa-llama3")]
TOL = 3e-2


def hf_reference(attn, rope, xs):
    """HF causal attention over a whole sequence [1, L, H] (the last rows are the new tokens)."""
    L = xs.shape[1]
    pos = torch.arange(L, device=xs.device)[None]
    with torch.no_grad():
        out, _ = attn(xs, position_embeddings=rope(xs, pos), attention_mask=causal_mask(xs))
    return out[0]


@pytest.mark.parametrize("hq,hkv,rope", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_prefill_then_decode_matches_transformers(device, hq, hkv, rope):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    from layerforge.runtime.llama_attention import LlamaPagedAttention
    torch.manual_seed(0)
    rope_kw = {"rope_parameters": rope} if rope else {"rope_theta": 500000.0}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=hq, num_key_value_heads=hkv, head_dim=64,
                                   attn_implementation="eager", vocab_size=11, num_hidden_layers=1,
                                   intermediate_size=32, **rope_kw)
    hf = LlamaAttention(cfg, layer_idx=0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.06)
    hf = hf.to(device).to(torch.bfloat16).eval()
    rope = LlamaRotaryEmbedding(cfg).to(device)
    ours = LlamaPagedAttention(cfg, page_size=16).to(device).to(torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    cache = ours.make_cache(num_pages=64, max_seqs=4, max_pages_per_seq=8)
    lens = {0: 7, 2: 20}
    for s, n in lens.items():
        cache.allocate(s, 40)
    history = {s: torch.randn(n, cfg.hidden_size, device=device, dtype=torch.bfloat16) for s, n in lens.items()}
    x = torch.cat([history[0], history[2]])
    seq_ids = [0] * lens[0] + [2] * lens[2]
    y = ours(x, seq_ids=seq_ids, cache=cache)
    want = torch.cat([hf_reference(hf, rope, history[0][None]), hf_reference(hf, rope, history[2][None])])
    check(y, want, "prefill", TOL)
    for step in range(3):
        new = {s: torch.randn(1, cfg.hidden_size, device=device, dtype=torch.bfloat16) for s in lens}
        y = ours(torch.cat([new[0], new[2]]), seq_ids=[0, 2], cache=cache)
        for s in lens:
            history[s] = torch.cat([history[s], new[s]])
        want = torch.cat([hf_reference(hf, rope, history[s][None])[-1:] for s in (0, 2)])
        check(y, want, f"decode step {step}", TOL)
    # a chunk of several tokens per sequence over the cached prefix (ragged prefill form),
    # then a step whose tokens are not grouped by sequence (per-token form)
    for ids in ([0, 0, 0, 2, 2], [2, 0, 2, 0]):
        new = torch.randn(len(ids), cfg.hidden_size, device=device, dtype=torch.bfloat16)
        y = ours(new, seq_ids=ids, cache=cache)
        want = torch.empty_like(y)
        for s in (0, 2):
            rows = [i for i, j in enumerate(ids) if j == s]
            history[s] = torch.cat([history[s], new[rows]])
            want[rows] = hf_reference(hf, rope, history[s][None])[-len(rows):]
        check(y, want, f"chunk {ids}", TOL)
