"""The plan of a sub-warp top-k: what each lane does, as data (the row lowering turns it into
CUDA C, tests/codegen/test_topk_lanes.py runs it on the CPU).

A row's candidates are spread over T lanes (T <= 32, a power of two), M per lane. Each
candidate becomes one 64-bit key that orders like (value desc, index asc):

    high word  the f32 value's bits, made order-preserving as unsigned (NaN canonical, above
               +inf, as torch.topk ranks it; -0.0 counts as +0.0)
    low word   ~index (a lower index gives a larger word)

and key 0 is below every real key: it stands for "no candidate" (columns past the row's
width, rows past the last). Then:

  1. each lane sorts its keys descending with a comparator network (Batcher's odd-even merge
     sort), pruned to the L = min(k, M) largest outputs: `sort_ops(M, L)`;
  2. k rounds, unrolled: a butterfly over the T lanes takes the largest head key (one 64-bit
     value: two 32-bit shuffles and one compare per step); every lane learns the winner, the
     lane whose head it is pops it (a shift of the keys it still needs: `round_depths`).

With T = 1 the sorted list is the answer. No shared memory, no barrier.
"""
from __future__ import annotations

import math

def _oddeven_merge_sort(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort on n (a power of two) wires; (i, j), i < j."""
    comps = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comps.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return comps


def _merge_tree(n: int, keep: int) -> list[tuple[str, int, int]]:
    """Sort blocks of B = pow2 >= keep wires, then merge blocks pairwise keeping the top B:
    c_i = max(a_i, b_(B-1-i)) is bitonic and holds the top B; half-cleaners sort it."""
    b = min(n, 1 << max(0, math.ceil(math.log2(max(1, keep)))))
    ops = [("cas", lo + i, lo + j) for lo in range(0, n, b) for i, j in _oddeven_merge_sort(b)]
    blocks = [list(range(lo, lo + b)) for lo in range(0, n, b)]
    while len(blocks) > 1:
        nxt = []
        for a, c in zip(blocks[0::2], blocks[1::2]):
            ops += [("max", a[i], c[b - 1 - i]) for i in range(b)]
            s = b // 2
            while s:
                ops += [("cas", a[i], a[i + s]) for i in range(b) if not i & s]
                s //= 2
            nxt.append(a)
        blocks = nxt
    return ops


def _fold_and_prune(raw, m: int, n: int, keep: int) -> list[tuple[str, int, int]]:
    sent = [p >= m for p in range(n)]
    ops = []
    for op, i, j in raw:
        if sent[j]:
            continue                      # max(a, 0) = a stays at i
        if sent[i]:
            ops.append(("swap", i, j))    # the real key moves to i, key 0 to j
            sent[i], sent[j] = False, True
            continue
        ops.append((op, i, j))
        if op == "max":
            sent[j] = True                # j is not used again; treat it as empty
    live = set(range(keep))
    out = []
    for op, i, j in reversed(ops):
        li, lj = i in live, j in live
        if op == "swap":
            if li or lj:
                live.discard(i), live.discard(j)
                live.update(([j] if li else []) + ([i] if lj else []))
                out.append((op, i, j))
            continue
        if op == "max":
            assert not lj
            if li:
                out.append(("max", i, j))
                live.add(j)
            continue
        if li and lj:
            out.append(("cas", i, j))
        elif li:
            out.append(("max", i, j))
        elif lj:
            out.append(("min", i, j))
        else:
            continue
        live.update((i, j))
    return list(reversed(out))


def op_cost(ops) -> int:
    """Rough SASS count: a 64-bit compare is 2, each 64-bit select 2."""
    return sum({"cas": 6, "max": 4, "min": 4, "swap": 0}[o[0]] for o in ops)


def sort_ops(m: int, keep: int) -> list[tuple[str, int, int]]:
    """Operations on wire positions 0..n-1 (n = pow2 >= m; wires >= m start as key 0) that
    leave the `keep` largest keys at positions 0..keep-1, descending:

        ("cas", i, j)   i := max, j := min
        ("max", i, j)   i := max (j is not used again)
        ("min", i, j)   j := min (i is not used again)
        ("swap", i, j)  exchange the two wires (a rename: no code)

    Comparators with a wire known to be key 0 fold at build time; comparators that cannot
    reach the kept outputs are dropped. Of Batcher's full sort and a merge tree of sorted
    blocks (cheaper when keep << m), the cheaper.
    """
    n = 1 << max(0, math.ceil(math.log2(max(1, m))))
    cands = [_fold_and_prune([("cas", i, j) for i, j in _oddeven_merge_sort(n)], m, n, keep),
             _fold_and_prune(_merge_tree(n, keep), m, n, keep)]
    return min(cands, key=op_cost)


def round_depths(k: int, keep: int) -> list[int]:
    """How many head entries each lane must still hold valid after round r (r < k)."""
    return [min(keep, k - 1 - r) for r in range(k)]


def key_of(value: float, index: int) -> int:
    """The 64-bit key of a candidate, as lf_topk_key computes it (for tests and emulation)."""
    import struct
    if value != value:
        hi = 0xFFFFFFFF
    else:
        if value == 0.0:
            value = 0.0
        u = struct.unpack("<I", struct.pack("<f", value))[0]
        hi = u ^ (0xFFFFFFFF if u >> 31 else 0x80000000)
    return (hi << 32) | ((~index) & 0xFFFFFFFF)


def value_of(key: int) -> float:
    import struct
    hi = key >> 32
    u = (hi ^ 0x80000000) if hi >> 31 else (~hi & 0xFFFFFFFF)
    return struct.unpack("<f", struct.pack("<I", u))[0]


def index_of(key: int) -> int:
    lo = key & 0xFFFFFFFF
    return (~lo) & 0xFFFFFFFF if lo else -1
