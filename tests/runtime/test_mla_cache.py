"""The paged latent cache's bookkeeping (runtime/mla_cache.py) on the CPU, where torch ops do the
append kernel's work: where rows land, the RoPE on k_pe at write, lengths and page tables on the
device side, and calls that are refused before anything changes."""
import numpy as np
import pytest
import torch

from layerforge.dsl.attention_ref import rotate
from layerforge.dsl.evaluator import LayerInputError
from layerforge.dsl.ir import RopeSpec
from layerforge.dsl.numerics import rope_cos_sin
from layerforge.runtime.mla_cache import KVCacheError, OutOfPagesError, PagedLatentCache

L, R = 16, 8
ROPE = RopeSpec(10000.0, "gptj", R)


def make(**kw):
    args = dict(num_pages=8, page_size=4, latent_dim=L, rope_dim=R, dtype=torch.float32, device="cpu", max_seqs=3,
                max_pages_per_seq=3)
    return PagedLatentCache(**{**args, **kw})


def rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, L, generator=g), torch.randn(n, R, generator=g)


def test_rows_land_in_pages_with_k_pe_rotated_at_their_positions():
    c = make()
    c.allocate(1, 2)                              # sequence 1 takes page 0 first
    assert c.allocate(0, 6) == [1, 2]
    lat, kpe = rows(6)
    pos = c.append([0] * 6, lat, kpe, ROPE)
    assert pos.tolist() == list(range(6)) and c.seq_len(0) == 6
    got = c.gather(0)
    assert got.shape == (6, L + R)
    torch.testing.assert_close(got[:, :L], lat, rtol=0, atol=0)
    cos, sin = rope_cos_sin(torch.arange(6), R, 10000.0)
    want = rotate(kpe.double(), cos, sin, "gptj", R).float()
    torch.testing.assert_close(got[:, L:], want)
    assert not torch.equal(got[1:, L:], kpe[1:])  # rotated (position 0 is the identity)
    torch.testing.assert_close(c.cache[2, 1], got[5])   # position 5: page 2 (the sequence's second), slot 1


def test_default_positions_follow_each_sequence_in_order_of_appearance():
    c = make()
    c.reserve([0, 2], [3, 5])
    c.append([2, 2], *rows(2), ROPE)
    pos = c.append([0, 2, 0, 2, 2], *rows(5, 1), ROPE)
    assert pos.tolist() == [0, 2, 1, 3, 4]
    assert c.seq_lens.tolist() == [2, 0, 5]
    pt = c.page_table
    assert pt[0, :1].tolist() == c.pages(0) and pt[2, :2].tolist() == c.pages(2) and pt[1].tolist() == [-1] * 3


def test_explicit_positions_and_lengths():
    c = make()
    c.allocate(1, 12)
    c.append([1, 1], *rows(2), ROPE, positions=[9, 3])
    assert c.seq_len(1) == 10                     # max(length, largest position + 1)
    with pytest.raises(KVCacheError, match="twice"):
        c.append([1, 1], *rows(2), ROPE, positions=[4, 4])


def test_free_returns_pages_and_zeroes_the_length():
    c = make()
    c.allocate(0, 9)
    c.append([0], *rows(1), ROPE)
    free = c.num_free_pages
    c.free(0)
    assert c.num_free_pages == free + 3 and c.seq_len(0) == 0
    assert c.seq_lens[0] == 0 and c.page_table[0].tolist() == [-1, -1, -1]


@pytest.mark.parametrize("call,error,match", [
    (lambda c: c.append([0], *rows(1), ROPE), KVCacheError, "allocate"),                       # no pages yet
    (lambda c: c.append([5], *rows(1), ROPE), KVCacheError, "out of range"),
    (lambda c: c.append([0], rows(1)[0].double(), rows(1)[1], ROPE), LayerInputError, "float32"),
    (lambda c: c.append([0], rows(1)[0][:, :8], rows(1)[1], ROPE), LayerInputError, "shape"),
    (lambda c: c.append([0, 0], *rows(1), ROPE), LayerInputError, "one per token"),
    (lambda c: c.append([0], *rows(1), RopeSpec(10000.0, "neox", R)), LayerInputError, "interleaved"),
    (lambda c: c.append([0], *rows(1), ROPE, positions=[-1]), KVCacheError, "negative"),
    (lambda c: c.allocate(0, 13), KVCacheError, "max_pages_per_seq"),
])
def test_bad_calls_change_nothing(call, error, match):
    c = make()
    before = (c.cache.clone(), c.seq_lens.clone(), c.page_table.clone(), c.num_free_pages)
    with pytest.raises(error, match=match):
        call(c)
    assert torch.equal(c.cache, before[0]) and torch.equal(c.seq_lens, before[1])
    assert torch.equal(c.page_table, before[2]) and c.num_free_pages == before[3]


def test_out_of_pages():
    c = make(num_pages=2)
    with pytest.raises(OutOfPagesError):
        c.allocate(0, 9)
    assert c.num_free_pages == 2


def test_constructor_checks():
    with pytest.raises(ValueError, match="power of two"):
        make(page_size=6)
    with pytest.raises(ValueError, match="bfloat16"):
        make(dtype=torch.float64)
    assert np.array_equal(make(dtype=torch.bfloat16).seq_lens_host, np.zeros(3))
