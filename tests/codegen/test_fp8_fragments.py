"""The index algebra of the fp8 tensor-core attention (templates/cuda/attention_tc.cu.jinja),
emulated on the CPU with the PTX semantics of ldmatrix (.trans) and mma.m16n8k16: the e4m3
staging tiles' swizzle (lf_st8) is a bijection of each row's chunks and free of bank conflicts
for the 8 rows a fragment read touches; K's fragments (lf_k8_frag) give S = Q K^T; V's
ldmatrix.trans of e4m3 pairs, split into even / odd channels, and the store's un-permutation
give O = P V. The GPU tests check the kernels themselves; this pins the algebra they follow."""
import numpy as np
import pytest

HDS = [64, 128, 256]


def st8(r: int, c: int, hd: int) -> int:
    """lf_st8: byte offset of 16-byte chunk c of row r in an e4m3 tile [rows][hd]."""
    return r * hd + ((c ^ ((r & 7) if hd >= 128 else ((r >> 1) & 3))) << 4)


def staged(tile: np.ndarray) -> np.ndarray:
    """The tile as the cp.async loads place it: chunk c of row r at st8(r, c)."""
    rows, hd = tile.shape
    smem = np.zeros(rows * hd, dtype=tile.dtype)
    for r in range(rows):
        for c in range(hd // 16):
            smem[st8(r, c, hd): st8(r, c, hd) + 16] = tile[r, 16 * c: 16 * c + 16]
    return smem


def mma(a: np.ndarray, b_frag, acc: np.ndarray) -> None:
    """acc[lane] += the C fragment of A (16x16) @ B, B given by lanes' (b0, b1) pairs."""
    B = np.zeros((16, 8))
    for t in range(32):
        g, tig = t >> 2, t & 3
        (B[2 * tig, g], B[2 * tig + 1, g]), (B[2 * tig + 8, g], B[2 * tig + 9, g]) = b_frag(t)
    C = a @ B
    for t in range(32):
        g, tig = t >> 2, t & 3
        acc[t] += [C[g, 2 * tig], C[g, 2 * tig + 1], C[g + 8, 2 * tig], C[g + 8, 2 * tig + 1]]


@pytest.mark.parametrize("hd", HDS)
def test_staging_swizzle_is_a_bijection_without_bank_conflicts(hd):
    for r in range(64):
        assert sorted(st8(r, c, hd) for c in range(hd // 16)) == [r * hd + 16 * c for c in range(hd // 16)]
    for r0 in range(0, 64, 8):   # 8 consecutive rows, same chunk: 8 distinct 16-byte bank groups
        for c in range(hd // 16):
            assert len({(st8(r0 + g, c, hd) % 128) // 16 for g in range(8)}) == 8


@pytest.mark.parametrize("hd", HDS)
def test_k_fragments_from_the_staging_tile_give_q_kt(hd):
    rng = np.random.default_rng(hd)
    K, Q = rng.standard_normal((16, hd)), rng.standard_normal((16, hd))
    smem = staged(K)

    def k_frag(kk, half):   # lf_k8_frag: b[0..3] = keys g / 8 + g, channel pairs 2 tig and 8 + 2 tig
        def frag(t):
            g, tig = t >> 2, t & 3
            p = st8(8 * half + g, kk, hd) + 2 * tig
            return (smem[p], smem[p + 1]), (smem[p + 8], smem[p + 9])
        return frag

    acc = np.zeros((2, 32, 4))
    for kk in range(hd // 16):
        for half in (0, 1):   # n-tiles of keys 0-7 and 8-15
            mma(Q[:, 16 * kk: 16 * kk + 16], k_frag(kk, half), acc[half])
    S = np.zeros((16, 16))
    for half in (0, 1):
        for t in range(32):
            g, tig = t >> 2, t & 3
            k = 8 * half + 2 * tig
            S[g, k], S[g, k + 1], S[g + 8, k], S[g + 8, k + 1] = acc[half, t]
    np.testing.assert_allclose(S, Q @ K.T, atol=1e-12)


@pytest.mark.parametrize("hd", HDS)
def test_v_pairs_by_ldmatrix_trans_and_the_store_permutation_give_p_v(hd):
    rng = np.random.default_rng(hd + 1)
    V, P = rng.standard_normal((16, hd)), rng.standard_normal((16, 16))
    smem = staged(V)
    o = np.zeros((hd // 8, 32, 4))
    for dp in range(hd // 32):
        # lane l addresses row (l & 7) + 8 ((l >> 3) & 1), chunk 2 dp + (l >> 4); matrix m = l // 8
        addr = [st8((l & 7) + (((l >> 3) & 1) << 3), 2 * dp + (l >> 4), hd) for l in range(32)]
        # .trans: lane (g, tig) gets b16 elements (row 2 tig, col g) and (row 2 tig + 1, col g):
        # bytes [v(2tig, 2g), v(2tig, 2g+1), v(2tig+1, 2g), v(2tig+1, 2g+1)]
        bv = [[np.concatenate([smem[addr[8 * m + 2 * (t & 3)] + 2 * (t >> 2):][:2],
                               smem[addr[8 * m + 2 * (t & 3) + 1] + 2 * (t >> 2):][:2]]) for m in range(4)]
              for t in range(32)]
        even = lambda w: (w[0], w[2])   # noqa: E731  (lf_e4m3_even_to)
        odd = lambda w: (w[1], w[3])    # noqa: E731  (lf_e4m3_odd_to)
        for d, pick, m0, m1 in ((4 * dp, even, 0, 1), (4 * dp + 1, odd, 0, 1), (4 * dp + 2, even, 2, 3),
                                (4 * dp + 3, odd, 2, 3)):
            mma(P, lambda t: (pick(bv[t][m0]), pick(bv[t][m1])), o[d])
    O = np.zeros((16, hd))
    for t in range(32):   # the store: chunk c, 4 channels a lane from tiles 2c (even) and 2c + 1 (odd)
        g, tig = t >> 2, t & 3
        for half in (0, 1):
            for c in range(hd // 16):
                O[g + 8 * half, 16 * c + 4 * tig: 16 * c + 4 * tig + 4] = [
                    o[2 * c, t, 2 * half], o[2 * c + 1, t, 2 * half], o[2 * c, t, 2 * half + 1], o[2 * c + 1, t, 2 * half + 1]]
    np.testing.assert_allclose(O, P @ V, atol=1e-12)


@pytest.mark.parametrize("hd", [64, 128])
def test_tma_path_hoisted_fragment_addresses_equal_the_swizzle(hd):
    """The TMA decode's K / V fragment addresses (templates/cuda/attention_tc.cu.jinja, TMA): a row base and one XOR a
    chunk, because every warp's keys start at a multiple of 16 and rows 8-aligned + g take g's swizzle. They equal
    lf_st8's for every lane, warp offset, chunk and row step (K: keys kw0 + 16 np + g (+ 8), chunk kk; V's ldmatrix
    rows kw0 + 16 kk + v_r, chunks 2 dp + v_c)."""
    def sw(r):   # lf_st8_sw
        return r & 7 if hd >= 128 else (r >> 1) & 3
    for lane in range(32):
        g, v_r, v_c = lane >> 2, (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4
        sw8, vx8 = sw(g), v_c ^ sw(v_r)
        for kw0 in range(0, 128, 16):
            kb8 = (kw0 + g) * hd
            for kk in range(hd // 16):
                for np_ in range(2):
                    for half in range(2):
                        assert kb8 + ((kk ^ sw8) << 4) + (np_ * 16 + 8 * half) * hd == st8(kw0 + np_ * 16 + 8 * half + g, kk, hd)
            vb8 = (kw0 + v_r) * hd
            for kk in range(2):
                for dp in range(hd // 32):
                    assert vb8 + kk * 16 * hd + ((2 * dp ^ vx8) << 4) == st8(kw0 + kk * 16 + v_r, 2 * dp + v_c, hd)
