"""PagedKVCache on the CPU: page allocation from the free list, positions of appended tokens,
the values stored (K rotated as the reference rotates it), and every bad append rejected
with a clear error before anything is written."""
import numpy as np
import pytest
import torch

from layerforge import LayerInputError
from layerforge.dsl.attention_ref import apply_rope
from layerforge.dsl.ir import RopeSpec
from layerforge.runtime.kv_cache import KVCacheError, OutOfPagesError, PagedKVCache

H, D, P = 2, 16, 4
NEOX = RopeSpec(10000.0, "neox", D)


def make_cache(num_pages=16, max_seqs=4, max_pages_per_seq=6, dtype=torch.bfloat16, page_size=P):
    return PagedKVCache(num_pages, page_size, H, D, dtype, "cpu", max_seqs, max_pages_per_seq)


def tokens(n, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, D, generator=g).to(dtype), torch.randn(n, H, D, generator=g).to(dtype)


@pytest.fixture
def no_write(monkeypatch):
    """Fail the test if an append gets as far as writing (launching, on a GPU)."""
    def fail(self, prep):
        raise AssertionError("append wrote although its input was bad")
    monkeypatch.setattr(PagedKVCache, "_write_torch", fail)
    monkeypatch.setattr(PagedKVCache, "_write_cuda", fail)


def poison(cache):
    cache.k_cache.fill_(float("nan"))
    cache.v_cache.fill_(float("nan"))


def state(cache):
    return (cache.seq_lens_host.copy(), cache.page_table_host.copy(), cache.num_free_pages,
            dict(cache._queued_pt), dict(cache._queued_lens))


def assert_unchanged(cache, before):
    after = state(cache)
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(before, after))
    assert torch.isnan(cache.k_cache).all() and torch.isnan(cache.v_cache).all()


# ---- pages -------------------------------------------------------------------------------

def test_allocate_takes_pages_from_the_free_list():
    c = make_cache()
    assert c.allocate(0, 5) == [0, 1]           # 5 tokens: two pages of 4
    assert c.allocate(1, 1) == [2]
    assert c.allocate(0, 9) == [0, 1, 3]        # grows; its first pages stay
    assert c.capacity(0) == 12 and c.capacity(1) == 4 and c.capacity(2) == 0
    assert c.num_free_pages == 16 - 4
    assert c.page_table[0, :4].tolist() == [0, 1, 3, -1]


def test_allocate_never_shrinks():
    c = make_cache()
    c.allocate(0, 12)
    assert c.allocate(0, 3) == [0, 1, 2] and c.allocate(0, 0) == [0, 1, 2]
    assert c.num_free_pages == 13


def test_free_returns_pages_and_resets_the_sequence():
    c = make_cache()
    c.allocate(0, 8)
    c.allocate(1, 4)
    c.append([0, 0, 0], *tokens(3))
    c.free(0)
    assert c.seq_len(0) == 0 and c.pages(0) == [] and c.capacity(0) == 0
    assert c.num_free_pages == 15
    assert c.seq_lens.tolist() == [0, 0, 0, 0] and c.page_table[0].tolist() == [-1] * 6
    assert c.allocate(3, 8) == [0, 1]           # freed pages come back first, in order
    c.free(0)                                   # freeing an empty sequence is harmless
    assert c.num_free_pages == 13


def test_out_of_pages_changes_nothing():
    c = make_cache(num_pages=4)
    c.allocate(0, 12)
    before = (c.pages(0), c.pages(1), c.num_free_pages)
    with pytest.raises(OutOfPagesError, match="sequence 1 needs 2 more pages for 8 tokens; 1 of 4 are free"):
        c.allocate(1, 8)
    assert (c.pages(0), c.pages(1), c.num_free_pages) == before


def test_a_sequence_holds_at_most_max_pages_per_seq():
    c = make_cache(max_pages_per_seq=2)
    with pytest.raises(KVCacheError, match=r"needs 3 pages for 9 tokens; at most max_pages_per_seq = 2 \(8 tokens\)"):
        c.allocate(0, 9)


@pytest.mark.parametrize("seq_id", [-1, 4, 1.0])
def test_bad_sequence_ids_are_clear_errors(seq_id):
    with pytest.raises(KVCacheError, match="seq_id"):
        make_cache().allocate(seq_id, 1)


# ---- append: positions and values -------------------------------------------------------

def test_new_tokens_follow_their_sequence_in_order():
    c = make_cache()
    c.allocate(0, 8)
    c.allocate(2, 8)
    assert c.append([2, 0, 2, 2], *tokens(4)).tolist() == [0, 0, 1, 2]
    assert c.append([0, 2, 0], *tokens(3)).tolist() == [1, 3, 2]
    assert c.seq_lens.tolist() == [3, 0, 4, 0]
    assert c.seq_lens_host.tolist() == [3, 0, 4, 0]


@pytest.mark.parametrize("rope", [None, NEOX, RopeSpec(500000.0, "gptj", D), RopeSpec(10000.0, "neox", D // 2),
                                  RopeSpec(10000.0, "gptj", 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stored_keys_are_rotated_at_their_positions(rope, dtype):
    c = make_cache(dtype=dtype)
    poison(c)
    c.allocate(1, 7)
    c.allocate(0, 2)
    k, v = tokens(9, dtype)
    ids = [1, 1, 0, 1, 1, 0, 1, 1, 1]
    c.append(ids[:5], k[:5], v[:5], rope)          # a prefill chunk
    for t in range(5, 9):                          # then one token at a time
        c.append(ids[t:t + 1], k[t:t + 1], v[t:t + 1], rope)
    for s in (0, 1):
        mine = [t for t, i in enumerate(ids) if i == s]
        gk, gv = c.gather(s)
        assert gk.shape == (len(mine), H, D) and gk.is_contiguous()
        ref = k[mine].double()
        if rope is not None:
            ref = apply_rope(ref[None], torch.arange(len(mine))[None], rope, int(rope.rotary_dim))[0]
        torch.testing.assert_close(gk, ref.to(dtype), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                   atol=1e-3)
        assert torch.equal(gv, v[mine])


def test_explicit_positions_may_rewrite_and_extend():
    c = make_cache()
    c.allocate(0, 12)
    k, v = tokens(6)
    c.append([0, 0, 0], k[:3], v[:3])
    assert c.append([0, 0], k[3:5], v[3:5], positions=[1, 6]).tolist() == [1, 6]
    assert c.seq_len(0) == 7                      # max(3, 6 + 1)
    gk, _ = c.gather(0)
    assert torch.equal(gk[0], k[0]) and torch.equal(gk[1], k[3]) and torch.equal(gk[6], k[4])
    c.append([0], k[5:], v[5:], positions=torch.tensor([2], dtype=torch.int32))
    assert c.seq_len(0) == 7 and torch.equal(c.gather(0)[1][2], v[5])


def test_seq_ids_may_be_lists_numpy_arrays_or_cpu_tensors():
    c = make_cache()
    c.allocate(0, 12)
    k, v = tokens(1)
    for ids in ([0], np.array([0], dtype=np.int32), torch.tensor([0], dtype=torch.int32), torch.tensor([0])):
        c.append(ids, k, v)
    assert c.seq_len(0) == 4


def test_tokens_may_be_strided_views_of_a_fused_projection():
    c = make_cache()
    c.allocate(0, 4)
    qkv = torch.randn(3, 5 * H * D).bfloat16()
    k = qkv[:, 3 * H * D: 4 * H * D].view(3, H, D)
    v = qkv[:, 4 * H * D:].view(3, H, D)
    c.append([0, 0, 0], k, v)
    assert torch.equal(c.gather(0)[1], v)


def test_empty_append_does_nothing():
    c = make_cache()
    out = c.append([], *tokens(0))
    assert out.shape == (0,) and c.seq_lens_host.tolist() == [0, 0, 0, 0]
    assert c.gather(0)[0].shape == (0, H, D)


def test_queued_page_table_and_lengths_travel_with_the_next_append():
    """The metadata the kernel reads (templates/cuda/kv_append.cu.jinja): page[T], position[T],
    then the queued seq_lens and page_table writes as (keys, values) columns, then each
    token's sequence (not read by the kernel: cache.last_tokens views it)."""
    c = make_cache(max_pages_per_seq=6)
    c.allocate(1, 5)                               # queues page_table[1, 0:2] = 0, 1
    prep = c._prepare([1, 1], *tokens(2), None, None)
    assert prep.meta.dtype == np.int32
    assert prep.meta.tolist() == [0, 0, 0, 1] + [1, 2] + [6, 7, 0, 1] + [1, 1]
    c.append([1, 1], *tokens(2))
    assert not c._queued_pt and not c._queued_lens
    c.free(1)                                      # queues seq_lens[1] = 0 and page_table[1, 0:2] = -1
    c.allocate(1, 1)                               # page 0 comes back first
    prep = c._prepare([1], *tokens(1), None, None)
    assert prep.meta.tolist() == [0, 0] + [1, 1] + [6, 7, 0, -1] + [1]


def test_device_tensors_follow_allocate_and_free_without_an_append():
    c = make_cache()
    c.allocate(2, 4)
    assert c.page_table[2, 0].item() == 0
    c.free(2)
    assert c.page_table[2, 0].item() == -1


def test_host_mirrors_are_read_only():
    c = make_cache()
    with pytest.raises(ValueError):
        c.page_table_host[0, 0] = 3
    with pytest.raises(ValueError):
        c.seq_lens_host[0] = 3


# ---- append: every bad input raises before anything is written ---------------------------

@pytest.fixture
def cache():
    c = make_cache()
    c.allocate(0, 8)                               # 2 pages: capacity 8
    c.allocate(1, 3)                               # 1 page: capacity 4
    c.append([0] * 6 + [1] * 2, *tokens(8))
    poison(c)
    return c


def rejects(cache, error, match, seq_ids, k, v, rope=None, **kw):
    before = state(cache)
    with pytest.raises(error, match=match):
        cache.append(seq_ids, k, v, rope, **kw)
    assert_unchanged(cache, before)


def test_position_past_capacity(cache, no_write):
    rejects(cache, KVCacheError, r"token 2 of sequence 0 goes to position 8, past the 2 page\(s\) of 4 it has "
            r"\(capacity 8\); call allocate\(0, 10\) first", [0, 0, 0, 0, 1], *tokens(5))


def test_unallocated_sequence(cache, no_write):
    rejects(cache, KVCacheError, r"sequence 3 goes to position 0, past the 0 page\(s\)", [3], *tokens(1))


def test_explicit_position_past_capacity(cache, no_write):
    rejects(cache, KVCacheError, "position 4, past", [1], *tokens(1), positions=[4])


def test_negative_position(cache, no_write):
    rejects(cache, KVCacheError, r"positions\[1\] = -1 is negative", [0, 0], *tokens(2), positions=[0, -1])


def test_position_written_twice_in_one_call(cache, no_write):
    rejects(cache, KVCacheError, "position 7 of sequence 0 is written twice", [0, 1, 0], *tokens(3),
            positions=[7, 1, 7])


def test_sequence_out_of_range(cache, no_write):
    rejects(cache, KVCacheError, r"seq_ids\[1\] = 4 is out of range \[0, max_seqs=4\)", [0, 4], *tokens(2))


def test_corrupt_page_table(cache, no_write):
    cache._pt[0, 1] = 16                           # as if the host bookkeeping were damaged
    rejects(cache, KVCacheError, r"page_table\[0, 1\] = 16 \(for token 0 at position 6\) is not a page in "
            r"\[0, num_pages=16\)", [0], *tokens(1))


def test_wrong_dtype(cache, no_write):
    k, v = tokens(1, torch.float16)
    rejects(cache, LayerInputError, r"'k' must be torch.bfloat16 \(the cache's dtype\), got torch.float16",
            [0], k, v)


def test_wrong_device(cache, no_write):
    k = torch.empty(1, H, D, dtype=torch.bfloat16, device="meta")
    rejects(cache, LayerInputError, "'k' is on meta, the cache on cpu", [0], k, tokens(1)[1])


@pytest.mark.parametrize("shape", [(1, H + 1, D), (1, H, D // 2), (H, D)])
def test_wrong_shape(cache, no_write, shape):
    rejects(cache, LayerInputError, rf"'v' must have shape \[T, {H}, {D}\]", [0], tokens(1)[0],
            torch.zeros(shape, dtype=torch.bfloat16))


def test_k_and_v_token_counts_differ(cache, no_write):
    rejects(cache, LayerInputError, "'k' has 2 tokens, 'v' 1", [0, 0], tokens(2)[0], tokens(1)[1])


def test_seq_ids_count_differs(cache, no_write):
    rejects(cache, LayerInputError, r"'seq_ids' must have shape \[2\] \(one per token\), got \[3\]", [0, 0, 0],
            *tokens(2))


def test_float_seq_ids(cache, no_write):
    rejects(cache, LayerInputError, "'seq_ids' must hold integers", torch.tensor([0.0]), *tokens(1))


def test_token_not_dense(cache, no_write):
    k = torch.zeros(1, D, H, dtype=torch.bfloat16).transpose(1, 2)
    rejects(cache, LayerInputError, r"each token of 'k' must be a dense \[2, 16\] block", [0], k, tokens(1)[1])


@pytest.mark.parametrize("rope,match", [
    (RopeSpec(10000.0, "neox", D + 2), "rotary_dim must be an even int in"),
    (RopeSpec(10000.0, "neox", 3), "rotary_dim must be an even int in"),
    (RopeSpec(10000.0, "alibi", D), "rope style"),
    (RopeSpec(0.0, "neox", D), "theta"),
])
def test_bad_rope(cache, no_write, rope, match):
    rejects(cache, ValueError, match, [0], *tokens(1), rope=rope)


# ---- construction -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype=torch.int32), "dtype must be torch.bfloat16, torch.float16 or torch.float32"),
    (dict(dtype="f64"), "dtype must be torch.bfloat16, torch.float16 or torch.float32"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(num_pages=0), "num_pages must be a positive int"),
    (dict(max_pages_per_seq=1 << 23), "positions past 2"),
    (dict(device="meta"), "device must be"),
])
def test_bad_construction(kwargs, match):
    args = dict(num_pages=4, page_size=4, num_kv_heads=H, head_dim=D, dtype=torch.bfloat16, device="cpu",
                max_seqs=2, max_pages_per_seq=4) | kwargs
    with pytest.raises(ValueError, match=match):
        PagedKVCache(**args)


def test_dtype_by_name_and_layout():
    c = PagedKVCache(8, 16, 4, 64, "f16", "cpu", 3, 5)
    assert c.k_cache.shape == c.v_cache.shape == (8, 16, 4, 64) and c.k_cache.dtype == torch.float16
    assert c.page_table.shape == (3, 5) and c.page_table.dtype == torch.int32
    assert c.seq_lens.shape == (3,) and c.seq_lens.dtype == torch.int32


def test_last_tokens_are_the_appended_sequences_and_positions():
    c = make_cache()
    with pytest.raises(KVCacheError, match="nothing has been appended"):
        c.last_tokens
    c.allocate(0, 8)
    c.allocate(2, 8)
    c.append([2, 0, 2], *tokens(3))
    ids, pos = c.last_tokens
    assert ids.dtype == pos.dtype == torch.int32 and ids.device == c.device
    assert ids.tolist() == [2, 0, 2] and pos.tolist() == [0, 0, 1]
    c.append([0, 2], *tokens(2))                   # a decode step: one token per sequence
    assert [t.tolist() for t in c.last_tokens] == [[0, 2], [1, 2]]
    assert c.seq_lens_host.tolist()[:3] == [2, 0, 3]


def test_model_steps_write_every_layer_once_planned():
    """begin_step plans a step once (lengths advance once), write() fills each layer's pages."""
    c = PagedKVCache(8, 4, H, D, torch.float32, "cpu", 3, 4, num_layers=3)
    c.allocate(0, 6)
    c.allocate(2, 3)
    ks = [torch.randn(5, H, D) for _ in range(3)]
    vs = [torch.randn(5, H, D) for _ in range(3)]
    step = c.begin_step([0, 0, 0, 2, 2])
    assert step.positions.tolist() == [0, 1, 2, 0, 1]
    for layer in range(3):
        c.write(step, layer, ks[layer], vs[layer])
    assert c.seq_len(0) == 3 and c.seq_len(2) == 2 and c.seq_lens.tolist() == [3, 0, 2]
    for layer in range(3):
        k0, v0 = c.gather(0, layer)
        k2, _ = c.gather(2, layer)
        assert torch.equal(k0, ks[layer][:3]) and torch.equal(v0, vs[layer][:3]) and torch.equal(k2, ks[layer][3:])
    step = c.begin_step([2, 0])
    assert step.positions.tolist() == [2, 3]
    with pytest.raises(LayerInputError, match="the step has 2 tokens"):
        c.write(step, 0, ks[0], vs[0])
    with pytest.raises(KVCacheError, match="layer 3 is out of range"):
        c.write(step, 3, ks[0][:2], vs[0][:2])


def test_reserve_and_advance_host():
    c = PagedKVCache(8, 4, H, D, torch.float32, "cpu", 3, 4)
    c.reserve([0, 2], [5, 1])
    assert len(c.pages(0)) == 2 and len(c.pages(2)) == 1 and c.pages(1) == []
    c.reserve([0, 2], 4)            # already enough: nothing allocated
    assert c.num_free_pages == 5
    c.advance_host([0, 2])
    assert c.seq_len(0) == 1 and c.seq_len(2) == 1
    with pytest.raises(KVCacheError, match="appears twice"):
        c.advance_host([0, 0])
    with pytest.raises(KVCacheError, match="out of range"):
        c.reserve([3], 1)
    for _ in range(3):
        c.advance_host([2])
    with pytest.raises(KVCacheError, match="no page for position 4"):
        c.advance_host([2])
    assert c.seq_len(2) == 4
