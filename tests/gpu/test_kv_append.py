"""The generated KV-cache append kernel against the reference: sequences of varied lengths
(1, and not multiples of the page size) filled over several appends (prefill chunks, then
decode steps), the cache poisoned with NaN first; K must equal `apply_rope` in float64 at each
token's position, cast to the cache dtype, and V must be copied bit for bit."""
import time

import numpy as np
import pytest
import torch

from layerforge import LayerInputError
from layerforge.dsl.attention_ref import apply_rope
from layerforge.dsl.ir import RopeSpec
from layerforge.dsl.numerics import YarnScaling
from layerforge.runtime.kv_cache import PagedKVCache

from ..seeding import seeded_generator

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
# The kernel rotates in f32 and rounds once; the reference rotates in float64. The two may
# round to neighbouring values (one unit in the last place), and f32 angles/cancellation
# leave ~1e-5 absolute: hence rtol = one ulp of the dtype, a small atol, and most elements exact.
RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
ATOL = 1e-3
MIN_EXACT = 0.97
ROPES = {
    "none": lambda d: None,
    "neox": lambda d: RopeSpec(10000.0, "neox", d),
    "gptj": lambda d: RopeSpec(500000.0, "gptj", d),
    "partial": lambda d: RopeSpec(10000.0, "neox", d // 2),
    "partial_gptj": lambda d: RopeSpec(10000.0, "gptj", d // 4),
    # scaled frequencies, and cos/sin times its attention factor (dsl/numerics)
    "yarn": lambda d: RopeSpec(500000.0, "neox", d, YarnScaling(factor=16.0, original_max_position=4096)),
}
LENGTHS = [1, 17, 64, 100, 33, 5, 300]


def reference_k(k: torch.Tensor, positions: torch.Tensor, rope, dtype) -> torch.Tensor:
    if rope is None:
        return k
    return apply_rope(k.double()[None], positions[None], rope, int(rope.rotary_dim))[0].to(dtype)


def check_k(name, got, ref, dtype):
    assert not torch.isnan(got).any(), f"{name}: NaN (a slot was not written)"
    torch.testing.assert_close(got.double(), ref.double(), rtol=RTOL[dtype], atol=ATOL, msg=lambda m: f"{name}: {m}")
    exact = (got == ref).double().mean().item()
    assert exact >= MIN_EXACT, f"{name}: only {exact:.3f} of the elements equal the rounded reference"


def interleave(counts: dict[int, int], gen: torch.Generator) -> list[int]:
    """Sequence ids, each `counts[s]` times, in a random interleaving."""
    ids = [s for s, n in counts.items() for _ in range(n)]
    return [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]


def fill(cache, lengths, rope, dtype, gen):
    """Append every sequence's tokens over several calls; returns its K and V (host order)."""
    H, D = cache.num_kv_heads, cache.head_dim
    ks = {s: torch.randn(n, H, D, generator=gen).to(dtype).cuda() for s, n in enumerate(lengths)}
    vs = {s: torch.randn(n, H, D, generator=gen).to(dtype).cuda() for s, n in enumerate(lengths)}
    decode = {s: min(4, n - 1) for s, n in enumerate(lengths)}
    prefill = {s: n - decode[s] for s, n in enumerate(lengths)}
    first = {s: n // 2 for s, n in prefill.items()}
    calls = [{s: n for s, n in first.items() if n}, {s: prefill[s] - first[s] for s in prefill}]
    calls += [{s: 1 for s, d in decode.items() if d > step} for step in range(4)]

    # pages of a short-lived sequence are freed first, so sequences get scattered pages
    spare = cache.max_seqs - 1
    cache.allocate(spare, 5 * cache.page_size)
    done = dict.fromkeys(ks, 0)
    for i, counts in enumerate(calls):
        if i == 1:
            cache.free(spare)
        ids = interleave(counts, gen)
        order = {s: iter(range(done[s], done[s] + n)) for s, n in counts.items()}
        rows = [next(order[s]) for s in ids]
        for s, n in counts.items():
            cache.allocate(s, done[s] + n)
        k = torch.stack([ks[s][r] for s, r in zip(ids, rows)])
        v = torch.stack([vs[s][r] for s, r in zip(ids, rows)])
        pos = cache.append(ids, k, v, rope)
        assert pos.tolist() == rows
        for s, n in counts.items():
            done[s] += n
    assert done == dict(enumerate(lengths))
    return ks, vs


def poisoned_cache(dtype, page_size, num_kv_heads=4, head_dim=128, num_pages=80, max_pages_per_seq=40):
    cache = PagedKVCache(num_pages, page_size, num_kv_heads, head_dim, dtype, "cuda",
                         len(LENGTHS) + 1, max_pages_per_seq)
    cache.k_cache.fill_(float("nan"))
    cache.v_cache.fill_(float("nan"))
    return cache


def check_cache(cache, ks, vs, rope, dtype, lengths=LENGTHS):
    torch.cuda.synchronize()
    H, D = cache.num_kv_heads, cache.head_dim
    for s, n in enumerate(lengths):
        gk, gv = cache.gather(s)
        assert gk.shape == (n, H, D)
        ref = reference_k(ks[s], torch.arange(n, device="cuda"), rope, dtype)
        check_k(f"sequence {s} (length {n})", gk, ref, dtype)
        assert torch.equal(gv, vs[s]), f"sequence {s}: V not copied exactly"
        if rope is not None:  # channels past rotary_dim are copied exactly
            rd = int(rope.rotary_dim)
            assert torch.equal(gk[..., rd:], ks[s][..., rd:])
    # nothing but the tokens' slots was written
    written = sum(lengths) * H * D
    assert int((~torch.isnan(cache.k_cache)).sum()) == written
    assert int((~torch.isnan(cache.v_cache)).sum()) == written
    # the kernel applied the queued bookkeeping: device tensors equal the host mirrors
    assert not cache._queued_pt and not cache._queued_lens
    assert torch.equal(cache._page_table.cpu(), torch.from_numpy(cache.page_table_host.copy()))
    assert cache._seq_lens.cpu().tolist() == cache.seq_lens_host.tolist()
    assert cache.seq_lens_host[: len(lengths)].tolist() == lengths


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_appended_tokens_match_the_reference(dtype, page_size, rope):
    cache = poisoned_cache(DTYPES[dtype], page_size)
    spec = ROPES[rope](cache.head_dim)
    gen = seeded_generator(dtype, page_size, rope)
    ks, vs = fill(cache, LENGTHS, spec, DTYPES[dtype], gen)
    check_cache(cache, ks, vs, spec, DTYPES[dtype])


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 256), (3, 80)])
@pytest.mark.parametrize("rope", ["neox", "partial_gptj"])
def test_other_head_shapes(num_kv_heads, head_dim, rope):
    dtype = torch.bfloat16
    cache = poisoned_cache(dtype, 16, num_kv_heads, head_dim)
    spec = ROPES[rope](head_dim)
    gen = seeded_generator(num_kv_heads, head_dim, rope)
    ks, vs = fill(cache, LENGTHS, spec, dtype, gen)
    check_cache(cache, ks, vs, spec, dtype)


@pytest.mark.parametrize("offset", [1, 2, 4])
@pytest.mark.parametrize("rope", ["neox", "gptj", "partial"])
def test_unaligned_views_of_a_fused_projection(rope, offset):
    """k and v as column slices of a [T, (Hq + 2 Hkv) D] output, shifted by `offset` elements:
    rows 2, 4 or 8 bytes aligned take a narrower plan."""
    dtype, H, D, Hq, T = torch.float16, 4, 128, 8, 37
    cache = poisoned_cache(dtype, 16, H, D)
    spec = ROPES[rope](D)
    width = (Hq + 2 * H) * D
    base = torch.randn(T, width + offset, generator=seeded_generator(rope, offset)).to(dtype).cuda()
    qkv = base[:, offset:]
    k = qkv[:, Hq * D:(Hq + H) * D].view(T, H, D)
    v = qkv[:, (Hq + H) * D:].view(T, H, D)
    cache.allocate(0, T)
    cache.append([0] * T, k, v, spec)
    torch.cuda.synchronize()
    gk, gv = cache.gather(0)
    check_k("unaligned", gk, reference_k(k, torch.arange(T, device="cuda"), spec, dtype), dtype)
    assert torch.equal(gv, v)


@pytest.mark.parametrize("rope", ["neox", "gptj"])
def test_large_positions_rotate_like_the_float64_reference(rope):
    """Far into a sequence the kernel's angle (pos * inv_freq formed in double, reduced to
    [-pi, pi] before __sincosf) still gives the float64 reference's rotation."""
    dtype, H, D, P = torch.bfloat16, 2, 128, 64
    spec = ROPES[rope](D)
    start, T = 50_000, 40
    cache = PagedKVCache(start // P + 4, P, H, D, dtype, "cuda", 2, start // P + 4)
    cache.allocate(0, start + T)
    gen = seeded_generator(rope)
    k = torch.randn(T, H, D, generator=gen).to(dtype).cuda()
    v = torch.randn(T, H, D, generator=gen).to(dtype).cuda()
    pos = torch.arange(start, start + T, dtype=torch.int32)
    cache.append([0] * T, k, v, spec, positions=pos)
    torch.cuda.synchronize()
    assert cache.seq_len(0) == start + T
    gk = cache.gather(0)[0][start:]

    # the kernel forms the angle in double from the float64 table: the reference's rotation
    ref = reference_k(k, pos.cuda().long(), spec, dtype)
    check_k("large positions", gk, ref.to(dtype), dtype)


def test_explicit_positions_rewrite_tokens():
    dtype = torch.bfloat16
    cache = poisoned_cache(dtype, 16)
    spec = ROPES["neox"](128)
    gen = seeded_generator("rewrite")
    k = torch.randn(20, 4, 128, generator=gen).to(dtype).cuda()
    v = torch.randn(20, 4, 128, generator=gen).to(dtype).cuda()
    cache.allocate(0, 20)
    cache.append([0] * 18, k[:18], v[:18], spec)
    cache.append([0, 0], k[18:], v[18:], spec, positions=[3, 18])  # rewrite 3, extend to 19 tokens
    torch.cuda.synchronize()
    assert cache.seq_len(0) == 19
    want_k = torch.cat([k[:3], k[18:19], k[4:18], k[19:]])
    want_v = torch.cat([v[:3], v[18:19], v[4:18], v[19:]])
    gk, gv = cache.gather(0)
    check_k("rewritten", gk, reference_k(want_k, torch.arange(19, device="cuda"), spec, dtype), dtype)
    assert torch.equal(gv, want_v)


def test_append_does_not_synchronise():
    dtype = torch.bfloat16
    cache = PagedKVCache(64, 16, 4, 128, dtype, "cuda", 8, 8)
    spec = ROPES["neox"](128)
    for s in range(4):
        cache.allocate(s, 100)
    k = torch.randn(4, 4, 128, device="cuda").to(dtype)
    v = torch.randn(4, 4, 128, device="cuda").to(dtype)
    cache.append([0, 1, 2, 3], k, v, spec)  # compiles and loads (its metadata carries the new pages)
    cache.append([0, 1, 2, 3], k, v, spec)  # warms the pinned and device allocators for this size
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)        # keeps the stream busy for about a second
    start = time.perf_counter()
    cache.append([0, 1, 2, 3], k, v, spec)
    elapsed = time.perf_counter() - start
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_busy and elapsed < 0.2, f"append waited for the GPU ({elapsed:.3f} s)"
    assert cache.seq_lens[:4].tolist() == [3, 3, 3, 3]


def test_bad_inputs_raise_before_writing():
    dtype = torch.bfloat16
    cache = poisoned_cache(dtype, 16)
    cache.allocate(0, 4)
    k = torch.randn(2, 4, 128, device="cuda").to(dtype)
    with pytest.raises(LayerInputError, match="must be on the host"):
        cache.append(torch.tensor([0, 0], device="cuda"), k, k)
    with pytest.raises(LayerInputError, match="'k' is on cpu"):
        cache.append([0, 0], k.cpu(), k)
    with pytest.raises(ValueError, match=r"call allocate\(0, 17\) first"):
        cache.append([0] * 17, *(torch.randn(17, 4, 128, device="cuda").to(dtype),) * 2)
    torch.cuda.synchronize()
    assert torch.isnan(cache.k_cache).all() and torch.isnan(cache.v_cache).all()
    assert cache.seq_lens_host[0] == 0
    assert np.array_equal(cache.seq_lens.cpu().numpy(), np.zeros(cache.max_seqs, dtype=np.int32))
