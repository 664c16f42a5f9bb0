"""The MoE permutation kernels (codegen/moe.py; runtime/moe_kernels.py) without a GPU: the plans'
keys, ABIs and refusals; every kernel compiling for sm_80 and sm_90 without spills, with the
16-byte accesses it promises; the work splits as data; the align kernel's algorithm run step by
step on the CPU against the reference; the references against plain loops (stability, empty
experts, counts, clamping); the runtime's input errors."""
import pytest
import torch

from layerforge.codegen.moe import (ALIGN_BATCH, ALIGN_WARPS, MAX_EXPERTS, ROW_THREADS, MoeAlignPlan, align_chunk,
                                    plan_moe_align, plan_moe_combine, plan_moe_gather, row_split)
from layerforge.runtime.moe_kernels import (MoEInputError, moe_align, moe_align_reference, moe_combine,
                                            moe_combine_reference, moe_gather, moe_gather_reference)

from ..seeding import seeded_generator


# ---- plans -----------------------------------------------------------------------------------
def test_keys():
    assert plan_moe_align(experts=8, k=2).key == "moe_align_e8_k2_sm90"
    assert plan_moe_gather(hidden=4096, dtype="bf16", arch="sm_80").key == "moe_gather_h4096_bf16_sm80"
    combine = dict(hidden=4096, k=2, dtype="bf16")
    assert plan_moe_combine(**combine).key == "moe_combine_h4096_k2_bf16_sm90"
    assert plan_moe_combine(**combine, shared=True, shared_gate=True).key == "moe_combine_h4096_k2_bf16_shared_gate_sm90"
    assert plan_moe_combine(**combine, shared=True, residual=True).key == "moe_combine_h4096_k2_bf16_shared_residual_sm90"
    assert plan_moe_combine(hidden=64, k=8, dtype="f16", residual=True).key == "moe_combine_h64_k8_f16_residual_sm90"


def test_abis():
    align = plan_moe_align(experts=512, k=8).abi
    assert [(a.name, a.role) for a in align.args] == [("ids", "input"), ("offsets", "output"), ("pos", "output"),
                                                      ("src", "output"), ("n_pairs", "dim")]
    assert align.grid_for() == (1, 1, 1) and align.block == (1024, 1, 1)
    assert align.shared_bytes == 32 * 512 * 4 + 128   # each warp's histogram, then the scan's 32 sums
    gather = plan_moe_gather(hidden=4096, dtype="f16").abi
    assert [a.name for a in gather.args] == ["x", "src", "xs", "n_slots", "n_tokens"]
    assert gather.block == (256, 1, 1) and gather.grid_for(1000) == (1000, 1, 1)
    small = plan_moe_gather(hidden=64, dtype="f16").abi
    assert small.block == (32, 8, 1) and small.grid_for(17) == (3, 1, 1)
    full = plan_moe_combine(hidden=4096, k=2, dtype="bf16", shared=True, shared_gate=True, residual=True).abi
    assert [a.name for a in full.args] == ["y", "pos", "w", "shared", "gate_logit", "residual", "out", "n_tokens"]
    assert full.arg("w").ctype == "const float* __restrict__"
    assert full.arg("gate_logit").ctype == "const __nv_bfloat16* __restrict__"
    assert [a.name for a in plan_moe_combine(hidden=4096, k=2, dtype="bf16").abi.args] == [
        "y", "pos", "w", "out", "n_tokens"]


@pytest.mark.parametrize("make,match", [
    (lambda: plan_moe_align(experts=MAX_EXPERTS + 1, k=2), "up to 512"),
    (lambda: plan_moe_align(experts=8, k=0), "positive int"),
    (lambda: plan_moe_align(experts=8, k=33), "k = 33"),
    (lambda: plan_moe_align(experts=8, k=2, arch="sm_61"), "sm_70"),
    (lambda: plan_moe_gather(hidden=100, dtype="bf16"), "multiple of 8"),
    (lambda: plan_moe_gather(hidden=128, dtype="f32"), "dtype"),
    (lambda: plan_moe_combine(hidden=128, k=2, dtype="bf16", shared_gate=True), "needs shared=True"),
    (lambda: plan_moe_combine(hidden=128, k=40, dtype="bf16"), "k = 40"),
    (lambda: plan_moe_combine(hidden=128, k=2, dtype="bf16", residual=1), "bool"),
])
def test_plan_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_plans_are_hashable_values():
    assert plan_moe_align(experts=8, k=2) == MoeAlignPlan(experts=8, k=2, arch="sm_90")
    assert len({plan_moe_combine(hidden=64, k=2, dtype="bf16"), plan_moe_combine(hidden=64, k=2, dtype="bf16")}) == 1
    assert plan_moe_align(experts=8, k=2).source() == plan_moe_align(experts=8, k=2).source()


# ---- the work splits, as data ----------------------------------------------------------------
@pytest.mark.parametrize("hidden", [8, 64, 512, 1024, 2048, 2880, 4096, 5120, 7168, 8192, 12288, 16384])
def test_row_split_covers_each_row_once_with_no_idle_step(hidden):
    tpr, rpb, iters = row_split(hidden)
    vecs = hidden // 8
    assert tpr % 32 == 0 and tpr * rpb <= ROW_THREADS and rpb >= 1
    assert tpr * iters >= vecs > tpr * (iters - 1)   # every vector once; no thread's last step is past the row
    assert tpr * iters - vecs < 32 * iters             # at most a warp's worth of idle lanes a step


def test_align_chunks_split_the_pairs_in_order():
    for pairs in [0, 1, 7, 31, 32, 33, 1000, 1024, 1025, 32768, 65536, 65537]:
        chunk = align_chunk(pairs)
        assert chunk % 32 == 0 and chunk * ALIGN_WARPS >= pairs
        starts = [min(w * chunk, pairs) for w in range(ALIGN_WARPS)]
        ends = [min(s + chunk, pairs) for s in starts]
        assert starts[0] == 0 and ends[-1] == pairs and all(e == s for e, s in zip(ends, starts[1:]))


def emulate_align(ids: list[int], experts: int, k: int):
    """The align kernel's steps (templates/cuda/moe_align.cu.jinja) on the CPU: warp ranges,
    batches of 32-lane steps, per-warp histograms, the column and block scans, the match-mask
    ranks and per-warp cursors."""
    pairs = len(ids)
    chunk = align_chunk(pairs)
    clamp = lambda i: min(max(i, 0), experts - 1)   # noqa: E731

    def steps(w):   # each 32-lane step of warp w, in order: [(lane, p, expert or -1)]
        begin = min(w * chunk, pairs)
        end = min(begin + chunk, pairs)
        for p0 in range(begin, end, 32 * ALIGN_BATCH):
            for u in range(ALIGN_BATCH):
                ps = [p0 + 32 * u + lane for lane in range(32)]
                yield [(lane, p, clamp(ids[p]) if p < end else -1) for lane, p in enumerate(ps)]

    hist = [[0] * experts for _ in range(ALIGN_WARPS)]
    for w in range(ALIGN_WARPS):                        # 1. counts
        for step in steps(w):
            for e in {e for _, _, e in step if e >= 0}:
                hist[w][e] += sum(1 for _, _, x in step if x == e)
    totals = [sum(hist[w][e] for w in range(ALIGN_WARPS)) for e in range(experts)]
    offsets = [0]
    for c in totals:                                    # 2. the block scan
        offsets.append(offsets[-1] + c)
    cursor = [[offsets[e] + sum(hist[v][e] for v in range(w)) for e in range(experts)] for w in range(ALIGN_WARPS)]
    pos, src = [None] * pairs, [None] * pairs
    for w in range(ALIGN_WARPS):                        # 3. ranks
        for step in steps(w):
            for lane, p, e in step:
                if e >= 0:
                    slot = cursor[w][e] + sum(1 for l2, _, x in step if x == e and l2 < lane)
                    assert src[slot] is None, "two pairs in one slot"
                    pos[p], src[slot] = slot, p // k
            for e in {e for _, _, e in step if e >= 0}:
                cursor[w][e] += sum(1 for _, _, x in step if x == e)
    return offsets, pos, src


def draw_ids(kind: str, tokens: int, k: int, experts: int, gen) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, experts, (tokens, k), generator=gen, dtype=torch.int32)
    if kind == "one_expert":
        return torch.full((tokens, k), experts - 1, dtype=torch.int32)
    if kind == "empty_experts":     # only every third expert, so runs of empty ones
        return torch.randint(0, -(-experts // 3), (tokens, k), generator=gen, dtype=torch.int32) * 3
    if kind == "out_of_range":      # clamped into [0, E)
        return torch.randint(-3, experts + 3, (tokens, k), generator=gen, dtype=torch.int32)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["uniform", "one_expert", "empty_experts", "out_of_range"])
@pytest.mark.parametrize("tokens,k,experts", [(1, 1, 8), (7, 1, 8), (31, 1, 60), (16, 2, 64), (33, 1, 8),
                                              (125, 8, 256), (1000, 1, 8), (700, 4, 512), (2049, 2, 128),
                                              (2500, 8, 64)])
def test_the_align_algorithm_is_the_stable_sort(tokens, k, experts, kind):
    ids = draw_ids(kind, tokens, k, experts, seeded_generator("moe_align_emulated", tokens, k, experts, kind))
    offsets, pos, src = emulate_align(ids.view(-1).tolist(), experts, k)
    ro, rp, rs = moe_align_reference(ids, experts)
    assert offsets == ro.tolist() and pos == rp.tolist() and src == rs.tolist()


# ---- the references' semantics ---------------------------------------------------------------
def loop_align(ids: list[list[int]], experts: int):
    """Pairs by expert, then by pair index: plain lists."""
    k = len(ids[0])
    flat = [min(max(i, 0), experts - 1) for row in ids for i in row]
    slots = [p for e in range(experts) for p in range(len(flat)) if flat[p] == e]
    counts = [flat.count(e) for e in range(experts)]
    offsets = [sum(counts[:e]) for e in range(experts + 1)]
    pos = [slots.index(p) for p in range(len(flat))]
    return offsets, pos, [p // k for p in slots]


@pytest.mark.parametrize("kind", ["uniform", "one_expert", "empty_experts", "out_of_range"])
@pytest.mark.parametrize("tokens,k,experts", [(1, 1, 8), (5, 2, 8), (40, 4, 60), (64, 8, 16)])
def test_align_reference_is_a_stable_counting_sort(tokens, k, experts, kind):
    ids = draw_ids(kind, tokens, k, experts, seeded_generator("moe_align_ref", tokens, k, experts, kind))
    offsets, pos, src = moe_align_reference(ids, experts)
    assert offsets.dtype == pos.dtype == src.dtype == torch.int32
    assert (offsets.tolist(), pos.tolist(), src.tolist()) == loop_align(ids.tolist(), experts)


def test_align_reference_example():
    ids = torch.tensor([[3, 1], [1, 3], [0, 3]], dtype=torch.int32)   # pairs 0..5
    offsets, pos, src = moe_align_reference(ids, 5)
    assert offsets.tolist() == [0, 1, 3, 3, 6, 6]          # experts 2 and 4 empty
    assert pos.tolist() == [3, 1, 2, 4, 0, 5]              # expert 3's pairs 0, 3, 5 in that order
    assert src.tolist() == [2, 0, 1, 0, 1, 2]              # slot j: the token of its pair


def test_gather_reference_copies_rows_and_clamps():
    x = torch.arange(12, dtype=torch.float32).view(4, 3)
    assert moe_gather_reference(x, torch.tensor([2, 0, 9, -1], dtype=torch.int32)).tolist() == [
        [6, 7, 8], [0, 1, 2], [9, 10, 11], [0, 1, 2]]
    assert moe_gather_reference(x, torch.zeros(0, dtype=torch.int32)).shape == (0, 3)


@pytest.mark.parametrize("shared,gate,residual", [(False, False, False), (True, False, False), (True, True, False),
                                                  (True, True, True), (False, False, True)])
def test_combine_reference_against_a_loop(shared, gate, residual):
    gen = seeded_generator("moe_combine_ref", shared, gate, residual)
    t, k, h, e = 6, 3, 16, 5
    ids = torch.randint(0, e, (t, k), generator=gen, dtype=torch.int32)
    _, pos, _ = moe_align_reference(ids, e)
    y = torch.randn(t * k, h, generator=gen, dtype=torch.float64)
    w = torch.rand(t, k, generator=gen, dtype=torch.float32)
    sh = torch.randn(t, h, generator=gen, dtype=torch.float64) if shared else None
    g = torch.randn(t, generator=gen, dtype=torch.float64) if gate else None
    r = torch.randn(t, h, generator=gen, dtype=torch.float64) if residual else None
    got = moe_combine_reference(y, pos, w, shared=sh, gate_logit=g, residual=r, precision="float64")
    for i in range(t):
        want = sum(float(w[i, s]) * y[int(pos[i * k + s])] for s in range(k))
        if shared:
            want = want + sh[i] * (1 / (1 + torch.exp(-g[i])) if gate else 1)
        if residual:
            want = want + r[i]
        assert torch.allclose(got[i], want, rtol=1e-12, atol=1e-12)


def test_combine_reference_rounds_once_from_f32():
    """bf16 has 8 significant bits: 1 + 2^-9 rounds to 1, 1 + 3 * 2^-9 to 1 + 2^-7."""
    y = torch.tensor([[1.0, 1.0], [2 ** -9, 2 ** -9]], dtype=torch.bfloat16)
    w = torch.ones(1, 2)
    pos = torch.tensor([0, 1], dtype=torch.int32)
    assert moe_combine_reference(y, pos, w).float().tolist() == [[1.0, 1.0]]
    r = torch.tensor([[2 ** -8, 2 ** -8]], dtype=torch.bfloat16)
    # rounding the experts' sum first would give 1, then 1 + 2^-8 (a tie, to even): 1 again
    assert moe_combine_reference(y, pos, w, residual=r).float().tolist() == [[1.0 + 2 ** -7] * 2]


# ---- the runtime: CPU tensors run the references; bad inputs are clear errors -----------------
def test_cpu_tensors_run_the_references():
    gen = seeded_generator("moe_cpu_path")
    ids = torch.randint(0, 8, (9, 2), generator=gen, dtype=torch.int32)
    offsets, pos, src = moe_align(ids, 8)
    assert all(torch.equal(a, b) for a, b in zip((offsets, pos, src), moe_align_reference(ids, 8)))
    x = torch.randn(9, 16, generator=gen).to(torch.bfloat16)
    xs = moe_gather(x, src)
    assert torch.equal(xs, x[src.long()])
    w = torch.rand(9, 2, generator=gen)
    out = torch.empty(9, 16, dtype=torch.bfloat16)
    assert moe_combine(xs, pos, w, residual=x, out=out) is out
    assert torch.equal(out, moe_combine_reference(xs, pos, w, residual=x))
    outs = tuple(torch.full_like(o, -7) for o in (offsets, pos, src))
    assert moe_align(ids, 8, out=outs) == outs and torch.equal(outs[1], pos)


I32 = torch.int32
BF = torch.bfloat16


@pytest.mark.parametrize("call,match", [
    (lambda: moe_align(torch.zeros(4, 2, dtype=torch.int64), 8), "'ids' must be torch.int32"),
    (lambda: moe_align(torch.zeros(8, dtype=I32), 8), "2 dimension"),
    (lambda: moe_align(torch.zeros(4, 2, dtype=I32).t(), 8), "contiguous"),
    (lambda: moe_align(torch.zeros(4, 2, dtype=I32), 513), r"num_experts must be an int in \[1, 512\]"),
    (lambda: moe_align(torch.zeros(4, 2, dtype=I32), 0), "num_experts"),
    (lambda: moe_align(torch.zeros(4, 0, dtype=I32), 8), r"k \+ fixed in"),
    (lambda: moe_align(torch.zeros(4, 2, dtype=I32), 8, out=(torch.zeros(9, dtype=I32),) * 3), "'pos' must be"),
    (lambda: moe_gather(torch.zeros(4, 12, dtype=BF), torch.zeros(8, dtype=I32)), "multiple of 8"),
    (lambda: moe_gather(torch.zeros(4, 16), torch.zeros(8, dtype=I32)), "'x' must be torch.bfloat16"),
    (lambda: moe_gather(torch.zeros(4, 16, dtype=BF), torch.zeros(4, 2, dtype=I32)), "'src' must have 1"),
    (lambda: moe_gather(torch.zeros(0, 16, dtype=BF), torch.zeros(3, dtype=I32)), "no rows"),
    (lambda: moe_gather(torch.zeros(4, 16, dtype=BF), torch.zeros(8, dtype=I32), out=torch.zeros(8, 16)), "'out'"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2, dtype=BF)),
     "'w' must be torch.float32"),
    (lambda: moe_combine(torch.zeros(6, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2)), r"T \* \(k \+ fixed\) = 8"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(7, dtype=I32), torch.zeros(4, 2)), "'pos' must be"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(2, 4, dtype=I32), torch.zeros(4, 2)), "'pos'"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2),
                         gate_logit=torch.zeros(4, dtype=BF)), "pass shared too"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2),
                         shared=torch.zeros(4, 16, dtype=torch.float16)), "'shared' must be torch.bfloat16"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2),
                         shared=torch.zeros(4, 16, dtype=BF), gate_logit=torch.zeros(4, 2, dtype=BF)),
     "'gate_logit' must be"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2),
                         residual=torch.zeros(4, 8, dtype=BF)), "'residual' must be \\[4, 16\\]"),
    (lambda: moe_combine(torch.zeros(8, 16, dtype=BF), torch.zeros(8, dtype=I32), torch.zeros(4, 2),
                         out=torch.zeros(4, 16, dtype=BF).t()), "'out' must be a contiguous"),
])
def test_input_errors(call, match):
    with pytest.raises(MoEInputError, match=match):
        call()


# ---- compilation -----------------------------------------------------------------------------
nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

PLANS = [
    lambda arch: plan_moe_align(experts=8, k=2, arch=arch),
    lambda arch: plan_moe_align(experts=60, k=4, arch=arch),
    lambda arch: plan_moe_align(experts=256, k=8, arch=arch),
    lambda arch: plan_moe_align(experts=512, k=1, arch=arch),
    lambda arch: plan_moe_gather(hidden=4096, dtype="bf16", arch=arch),
    lambda arch: plan_moe_gather(hidden=2880, dtype="f16", arch=arch),
    lambda arch: plan_moe_gather(hidden=64, dtype="bf16", arch=arch),
    lambda arch: plan_moe_combine(hidden=4096, k=2, dtype="bf16", shared=True, shared_gate=True, arch=arch),
    lambda arch: plan_moe_combine(hidden=7168, k=8, dtype="bf16", shared=True, residual=True, arch=arch),
    lambda arch: plan_moe_combine(hidden=2880, k=4, dtype="f16", residual=True, arch=arch),
    lambda arch: plan_moe_combine(hidden=2048, k=8, dtype="f16", shared=True, shared_gate=True, residual=True,
                                  arch=arch),
    lambda arch: plan_moe_combine(hidden=64, k=1, dtype="bf16", arch=arch),
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("make", PLANS, ids=lambda m: m("sm_90").key.removesuffix("_sm90"))
def test_kernel_compiles_without_spills(make, arch):
    plan = make(arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch), want_ptx=True)
    assert res.cubin[:4] == b"\x7fELF"
    kr = res.resources[plan.kernel_name]
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (plan.key, kr)
    ptx = res.ptx
    if plan.family == "moe_align":
        assert kr.registers <= 64, kr                     # 1024 threads a block
        assert "match.any.sync.b32" in ptx and plan.abi.shared_bytes == 32 * plan.experts * 4 + 128
    else:                                                 # 16-byte loads and stores only
        tpr, _, iters = row_split(plan.hidden)
        rows = 1 if plan.family == "moe_gather" else plan.k + plan.shared + plan.residual
        assert ptx.count("ld.global.nc.v4") == rows * iters, plan.key
        assert ptx.count("st.global.v4") == iters, plan.key
        assert "ld.global.nc.u16" not in ptx.replace(".b16", ".u16") or plan.shared_gate, plan.key
