"""A model of the MLA decode's seesaw schedule (templates/cuda/mla_decode_wgmma.cu.jinja, SEESAW; benchmarks/NOTES.md
"MLA decode: the consumers take turns"), on the CPU, to re-run whenever that schedule's order changes:
1. its bookkeeping in numpy: the running max each consumer takes from the other, O's factors applied to both halves
   and to both consumers' row sums, the last tile's P V by the other consumer: the result equals softmax attention;
2. its synchronisation: a producer and two consumers with the template's waits and arrivals (mbarriers full / empty
   with phases, named barriers 3 / 4 arrived by a tile's owner and synced by the other), under random interleavings:
   no deadlock, no stage refilled while a consumer reads it, no second arrival on a named barrier before the first is
   synced. The first version (a consumer's own P V left running into its next tile) is modelled too: it deadlocks.
The model mirrors the template's order by hand: it checks the design, not the generated code.

    python scripts/model_mla_seesaw.py
"""
import random

import numpy as np


# ---- 1. bookkeeping ----
rng = np.random.default_rng(0)
LAZY = 8.0
def run(ntiles, BN=64, H=8, L=16, scale=0.3):
    S_all = rng.standard_normal((H, ntiles * BN)) * 4 * scale / 0.3 * np.log2(np.e)   # log2-unit scores
    V = rng.standard_normal((ntiles * BN, L))
    # reference
    p = np.exp2(S_all - S_all.max(1, keepdims=True)); ref = (p @ V) / p.sum(1, keepdims=True)
    # seesaw: consumer cw owns tiles cw, cw+2..; O halves: cols [0:L/2], [L/2:]
    O = [np.zeros((H, L // 2)), np.zeros((H, L // 2))]
    l = [np.zeros(H), np.zeros(H)]
    m = [np.full(H, -np.inf), np.full(H, -np.inf)]
    sM, sC, P = {}, {}, {}
    # events in the order the barriers force: tile i's owner runs its own-block after the other's prev-block of i-1
    for i in range(ntiles):
        w = i % 2; o = 1 - w
        # owner w: prev block for tile i-1 (other's) happened before (if i >= 1)
        if i >= 1:
            c = sC[i - 1]; m[w] = sM[i - 1].copy()
            O[w] *= c[:, None]; l[w] *= c
            O[w] += P[i - 1] @ V[(i - 1) * BN:i * BN, w * (L // 2):(w + 1) * (L // 2)]
        s = S_all[:, i * BN:(i + 1) * BN]
        mx = s.max(1)
        m_new = np.where(mx > m[w] + LAZY, mx, m[w])
        corr = np.where(m_new == m[w], 1.0, np.exp2(m[w] - m_new))
        m[w] = m_new
        mu = np.where(m_new == -np.inf, 0, m_new)
        pt = np.exp2(s - mu[:, None])
        l[w] = l[w] * corr + pt.sum(1)
        P[i], sM[i], sC[i] = pt, m_new.copy(), corr
        O[w] *= corr[:, None]
        O[w] += pt @ V[i * BN:(i + 1) * BN, w * (L // 2):(w + 1) * (L // 2)]
    # the last tile's P V by the non-owner
    if ntiles >= 1:
        i = ntiles - 1; o = 1 - i % 2
        c = sC[i]; m[o] = sM[i]
        O[o] *= c[:, None]; l[o] *= c
        O[o] += P[i] @ V[i * BN:(i + 1) * BN, o * (L // 2):(o + 1) * (L // 2)]
    ltot = l[0] + l[1]
    out = np.concatenate(O, 1) / ltot[:, None]
    return np.abs(out - ref).max(), np.abs(m[0] - m[1]).max()


# ---- 2. synchronisation ----
# A model of the seesaw schedule's synchronisation (producer, two consumers; mbarriers full/empty with phases, named
# barriers 3/4 with arrive/sync), run under random interleavings: every run must finish (no deadlock), and no stage
# may be refilled while a consumer still reads it.
STAGES = 2
def simulate(ntiles, seed, buggy=False):
    rnd = random.Random(seed)
    full_phase = [0] * STAGES        # completed phases
    empty_cnt = [0] * STAGES; empty_phase = [0] * STAGES
    readers = [set() for _ in range(STAGES)]   # tiles being read per stage
    loaded = {}                      # stage -> tile
    nb_arr = {3: 0, 4: 0}            # named barriers: arrivals by the owner, syncs passed by the other
    synced = {3: 0, 4: 0}
    def producer():
        for i in range(ntiles):
            st, ph = i % STAGES, i // STAGES
            # wait empty phase ph ^ 1 semantics: uses >= 1 need (i // STAGES) completed empties
            while empty_phase[st] < ph: yield
            assert not readers[st], ("refill while read", i)
            loaded[st] = i
            full_phase[st] += 1
            yield
    def consumer(cw):
        j = cw
        gen = synced
        pend = None
        while True:
            own, prev = j < ntiles, j >= 1 and j - 1 < ntiles
            if not own and not prev: break
            if buggy and own:   # first version: the next own S waited for its stage before releasing the pending one
                st = j % STAGES
                while full_phase[st] < j // STAGES + 1: yield
            if buggy and pend is not None:
                pst, pj = pend
                readers[pst].discard((cw, pj)); empty_cnt[pst] += 1
                if empty_cnt[pst] == 2: empty_cnt[pst] = 0; empty_phase[pst] += 1
                pend = None
            if prev:
                i = j - 1; st = i % STAGES; b = 3 + (i & 1)
                # named barrier sync: wait until the owner's arrival for this generation
                while nb_arr[b] <= gen[b]: yield
                gen[b] += 1
                while full_phase[st] < i // STAGES + 1: yield
                assert loaded[st] == i
                readers[st].add((cw, i)); yield; readers[st].discard((cw, i))
                empty_cnt[st] += 1
                if empty_cnt[st] == 2: empty_cnt[st] = 0; empty_phase[st] += 1
            if own:
                st = j % STAGES
                while full_phase[st] < j // STAGES + 1: yield
                assert loaded[st] == j
                readers[st].add((cw, j)); yield
                b = 3 + (j & 1)
                # a consumer is at most one generation ahead: the other has synced the previous one
                assert nb_arr[b] == gen_other(b), "two arrivals before a sync"
                nb_arr[b] += 1
                yield
                if buggy:
                    pend = (st, j)
                else:
                    readers[st].discard((cw, j))
                    empty_cnt[st] += 1
                    if empty_cnt[st] == 2: empty_cnt[st] = 0; empty_phase[st] += 1
            j += 2
        if pend is not None:
            pst, pj = pend
            readers[pst].discard((cw, pj)); empty_cnt[pst] += 1
            if empty_cnt[pst] == 2: empty_cnt[pst] = 0; empty_phase[pst] += 1
    def gen_other(b):   # how many syncs the non-owner of barrier b has passed
        return synced[b]
    cons = [consumer(0), consumer(1)]
    procs = [producer(), *cons]
    alive = list(procs)
    steps = 0
    while alive:
        p = rnd.choice(alive)
        try: next(p)
        except StopIteration: alive.remove(p)
        steps += 1
        if steps > 100000: raise RuntimeError(f"deadlock ntiles={ntiles} seed={seed}")
    return True


if __name__ == "__main__":
    worst = max(run(n)[0] for n in (1, 2, 3, 4, 7, 16))
    print(f"bookkeeping: largest difference from softmax attention over 1-16 tiles {worst:.1e}")
    assert worst < 1e-12
    for n in range(0, 12):
        for sd in range(200):
            simulate(n, sd)
    print("synchronisation: no deadlock, no refill under a reader, at most one arrival ahead (0-11 tiles, 200 orders each)")
    try:
        for n in range(0, 12):
            for sd in range(50):
                simulate(n, sd, buggy=True)
        raise SystemExit("the first version's deadlock was not found: the model is wrong")
    except RuntimeError as e:
        print(f"the first version: {e} (as expected)")
