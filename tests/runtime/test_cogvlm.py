"""CogVLM attention on CPU (the reference evaluator's path) against the float64 implementation of
the published attention (tests/cogvlm_ref.py); positions and expert selection on hand examples."""
from __future__ import annotations

import pytest
import torch

from layerforge.runtime.cogvlm import CogVLMAttention, expert_mask, position_ids
from tests.cogvlm_ref import ref_attention, ref_expert, ref_positions, random_state

# text, boi, 3 patches, eoi, text text
TYPES = [0, 0, 1, 1, 1, 1, 0, 0]


def test_positions_and_experts_by_hand():
    assert position_ids(torch.tensor([TYPES])).tolist() == [[0, 1, 2, 3, 3, 4, 5, 6]]
    assert expert_mask(torch.tensor([TYPES])).tolist() == [[False, False, True, True, True, False, False, False]]
    # an image at the start and at the end; padding does not advance the position, and (as the published
    # counting has it) the first kept token after left padding already sits at 1
    types = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]])
    keep = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1]])
    assert position_ids(types, keep).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 3, 3, 4, 5]]
    for row, k in zip(types.tolist(), keep.tolist()):
        assert ref_positions(row, [bool(x) for x in k]) == position_ids(torch.tensor([row]), torch.tensor([k]))[0].tolist()
        assert ref_expert(row) == expert_mask(torch.tensor([row]))[0].tolist()


def _module(H, heads, kv_heads, **cfg):
    m = CogVLMAttention({"hidden_size": H, "num_attention_heads": heads, "num_multi_query_heads": kv_heads, **cfg},
                        dtype="f32", page_size=4)
    sd = random_state(H, heads, kv_heads, vision_bias=bool(cfg.get("vision_qkv_bias")))
    m.load_state_dict(sd)
    return m, sd


@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 4, False), (4, 2, True)])
def test_dense_batch_matches_float64(heads, kv_heads, bias):
    torch.manual_seed(1)
    H, L = 32, 11
    m, sd = _module(H, heads, kv_heads, vision_qkv_bias=bias)
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]])
    keep = torch.tensor([[1] * L, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    x = torch.randn(2, L, H)
    got = m.attend_dense(x, types, keep)
    want = ref_attention(sd, x, types, keep, heads=heads, kv_heads=kv_heads)
    assert not got.isnan().any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (got[1, :2] == 0).all()        # padding rows are zeros


def test_prefill_then_decode_equals_whole_sequence():
    torch.manual_seed(2)
    H, heads = 32, 4
    m, sd = _module(H, heads, heads)
    types = torch.tensor([TYPES + [0, 0]])
    x = torch.randn(1, 10, H)
    want = ref_attention(sd, x, types, None, heads=heads, kv_heads=heads)
    pos = position_ids(types)[0]
    vis = expert_mask(types)[0]
    cache = m.make_cache(num_pages=4, max_seqs=2, max_pages_per_seq=4)
    cache.allocate(1, 10)
    y = m(x[0, :8], seq_ids=[1] * 8, vision=vis[:8], positions=pos[:8], cache=cache)
    outs = [y]
    for t in (8, 9):   # decode: text tokens, one step each
        outs.append(m(x[0, t:t + 1], seq_ids=[1], vision=[False], positions=[int(pos[t])], cache=cache))
    torch.testing.assert_close(torch.cat(outs).double(), want[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_clear_errors():
    m, _ = _module(32, 4, 4)
    cache = m.make_cache(num_pages=2, max_seqs=1, max_pages_per_seq=2)
    cache.allocate(0, 4)
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="one entry per token"):
        m(x, seq_ids=[0, 0, 0], vision=[False, False], positions=[0, 1, 2], cache=cache)
    with pytest.raises(ValueError, match="positions must be on the host"):   # a device tensor: no silent sync
        m(x, seq_ids=[0, 0, 0], vision=[False] * 3, positions=torch.zeros(3, dtype=torch.long, device="meta"),
          cache=cache)
    with pytest.raises(ValueError, match=r"hidden must be \[T, 32\]"):
        m(torch.randn(3, 16), seq_ids=[0, 0, 0], vision=[False] * 3, positions=[0, 1, 2], cache=cache)
    with pytest.raises(ValueError, match="multiple"):
        CogVLMAttention({"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="lacks 'hidden_size'"):
        CogVLMAttention({"num_attention_heads": 4})
    with pytest.raises(ValueError, match="attention_mask"):
        m.attend_dense(torch.randn(1, 4, 32), torch.zeros(1, 4), torch.ones(1, 5))
