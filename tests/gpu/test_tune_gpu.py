"""`layerforge tune` on the GPU (runtime/tune.py): the splits of a product are timed beside the rules' plan on
cold weights, the winner goes to the table, and the planner's product then runs the recorded split and matches
float64 (outputs poisoned with NaN first), for bf16, u4 and W8A8 e4m3 weights."""
import contextlib
import dataclasses
import fcntl
import math
import os
import tempfile

import pytest
import torch

from layerforge.codegen import tuning
from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime import linear
from layerforge.runtime.quant import QuantLinear, dequantize, gemv_quant
from layerforge.runtime.tune import _label, tune_products

from ..seeding import seeded_generator
from .products import epilogue, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("wtype", [None, "u4"])
def test_tune_records_the_fastest_split_and_the_product_runs_it(tuning_table, wtype):
    n, k, m = 3000, 2048, 9
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    before = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype=wtype, group=128 if wtype else 0)
    cands = [(1, 2, 3), (2, 4, 2), (1, 4, 4)]
    (res,) = tune_products([("p", n, k, None)], tokens=(m,), wtype=wtype, group=128, margin=0.0, candidates=cands,
                           log=lambda s: None)
    assert res.bucket == 16 and len(res.timings) >= 2
    assert all(math.isfinite(t) and t > 0 for t in res.timings.values())
    # the best split's time as recorded (the fastest candidate timed twice, its slower time kept; the rules' where
    # that is no faster): the table's time of that split, at most the rules'
    assert res.best_us == res.timings[_label(res.best)] <= res.rules_us
    plan = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype=wtype, group=128 if wtype else 0)
    if res.recorded:   # the product's plan is now the measured best split
        assert (plan.rt, plan.warps, plan.stages) == (res.best["rt"], res.best["warps"], res.best["stages"])
    else:              # the rules' plan won (or another split within the margin of 0: none here)
        assert plan.key == before.key and res.best == res.rules
    gen = seeded_generator("tune", n, k, wtype)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    if wtype:
        lin = QuantLinear.from_float(w, 128, wtype=wtype, dtype=torch.bfloat16).cuda()
        gemv_quant(x, lin.qw, out=out)
        ref = reference(x, dequantize(lin.qw), None, None, None)
    else:
        w = w.cuda()
        linear.gemv(x, w, out=out)
        ref = reference(x, w, None, None, None)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="W8A8 e4m3 needs an sm_89+ GPU")
@pytest.mark.parametrize("x_e4m3", [True, False], ids=["x_first", "x_in_registers"])
@pytest.mark.parametrize("group", [0, 128])
def test_tune_fp8_weights_records_a_split_the_w8a8_product_then_runs(tuning_table, group, x_e4m3, monkeypatch):
    """f8 / f8b (x quantised first, the layer's default path) and f8r / f8br (x quantised in the kernel's loop): the
    splits of the W8A8 product timed and recorded like u4's; the product then runs the recorded split on that path
    and matches float64 of the dequantised W and of x quantised as the kernel does (test_gemv_fp8's reference,
    1e-2)."""
    from layerforge.runtime import launch
    from .test_gemv_fp8 import rel_err, w8a8_reference
    n, k, m = 3000, 2048, 9
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    path = dict(x_e4m3=True, x_group=128) if x_e4m3 else {}
    before = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype="f8e4m3", group=group, **path)
    (res,) = tune_products([("p", n, k, None)], tokens=(m,), wtype="f8e4m3", group=group, margin=0.0,
                           candidates=[(1, 2, 3), (2, 4, 2), (1, 8, 2)], x_e4m3=x_e4m3, log=lambda s: None)
    assert res.bucket == 16 and len(res.timings) >= 2 and res.best_us == res.timings[_label(res.best)] <= res.rules_us
    plan = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype="f8e4m3", group=group, **path)
    if res.recorded:
        assert (plan.rt, plan.warps, plan.stages) == (res.best["rt"], res.best["warps"], res.best["stages"])
    else:
        assert plan.key == before.key and res.best == res.rules
    monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1" if x_e4m3 else "0")
    loaded = []
    real = launch.load_plan
    monkeypatch.setattr(launch, "load_plan", lambda p, *a, **kw: loaded.append(p.key) or real(p, *a, **kw))
    gen = seeded_generator("tune-fp8", n, k, group)
    lin = QuantLinear.from_float(torch.randn(n, k, generator=gen) / k ** 0.5, group, wtype="f8e4m3",
                                 dtype=torch.bfloat16).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    gemv_quant(x, lin.qw, out=out)
    assert rel_err(out, w8a8_reference(x, lin)) < 1e-2
    assert plan.key in loaded, (plan.key, loaded)   # the tuned path ran the plan the table gave it


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="W8A8 e4m3 needs an sm_89+ GPU")
@pytest.mark.parametrize("group", [0, 128])
def test_tune_fp8_paths_times_both_paths_and_the_layer_then_takes_the_faster(tuning_table, group, monkeypatch):
    """tune_fp8_paths times gemv_quant's W8A8 call on both paths (x first, in registers) at 4 and 12 rows (buckets 8
    and 16); where it records the path the rows' rule does not take, the layer's call then runs that path's kernel
    (an x-first plan reads e4m3 x: its key has "xk128"), and either way it matches float64 (test_gemv_fp8's
    reference)."""
    from layerforge.runtime import launch, quant
    from layerforge.runtime.tune import tune_fp8_paths
    from .test_gemv_fp8 import rel_err, w8a8_reference
    n, k = 3072, 2048
    monkeypatch.delenv("LAYERFORGE_FP8_QUANT_X_FIRST", raising=False)
    res = tune_fp8_paths([("p", n, k, None)], tokens=(4, 12), group=group, margin=0.0, log=lambda s: None)
    assert [r.bucket for r in res] == [8, 16]
    assert all(math.isfinite(t) and t > 0 for r in res for t in r.timings.values())
    gen = seeded_generator("tune-fp8-paths", n, k, group)
    lin = QuantLinear.from_float(torch.randn(n, k, generator=gen) / k ** 0.5, group, wtype="f8e4m3",
                                 dtype=torch.bfloat16).cuda()
    real = launch.load_plan
    for r, m in zip(res, (4, 12)):
        x_first = bool(r.best["x_first"]) if r.recorded else bool(r.rules["x_first"])
        monkeypatch.setattr(linear, "_KERNELS", {})   # the tuner's calls made launchers: load them again, seen
        monkeypatch.setattr(quant, "_DEQUANT", {})
        loaded = []
        monkeypatch.setattr(launch, "load_plan", lambda p, *a, **kw: loaded.append(p.key) or real(p, *a, **kw))
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        gemv_quant(x, lin.qw, out=out)
        assert rel_err(out, w8a8_reference(x, lin)) < 1e-2
        gemv_keys = [key for key in loaded if key.startswith("gemv_")]
        assert gemv_keys and all(("xk128" in key) == x_first for key in gemv_keys), (r, loaded)


def test_a_route_entry_sends_the_calls_to_torchs_product(tuning_table, monkeypatch):
    """A "route" entry (torch's product measured faster than every split) sends calls of exactly its problem to
    torch's product with the epilogue in torch; a call with a norm prologue, another bucket or another N keeps
    the kernel."""
    n, k = 3000, 2048
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    tuning.write_entry(tuning_table, "route", {"cublas": 1}, arch=arch, dtype="bf16", wtype=None, group=0,
                       gated="silu", n=n, k=k, bucket=8)
    launches = []
    real = linear.launch_gemv
    monkeypatch.setattr(linear, "launch_gemv", lambda *a, **kw: launches.append(a[2:4]) or real(*a, **kw))
    gen = seeded_generator("tune-route", n, k)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
    x = torch.randn(5, k, generator=gen).to(torch.bfloat16).cuda()
    y = linear.gemv(x, w, gated="silu")
    assert launches == [] and torch.equal(y, linear._torch_product(x, w, None, "silu", None))
    gamma = torch.ones(k, dtype=torch.bfloat16, device="cuda")
    linear.gemv(x, w, gated="silu", norm=(gamma, 1e-5))                 # a norm prologue: the kernel
    linear.gemv(torch.randn(12, k, device="cuda", dtype=torch.bfloat16), w, gated="silu")   # bucket 16: the kernel
    linear.gemv(x, w[: n - 8], gated="silu")                            # another N: the kernel
    assert launches == [(n, k), (n, k), (n - 8, k)]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the Hopper GEMM needs an sm_90 GPU")
@pytest.mark.parametrize("tail,bn,gated,m,bias", [(16, 256, None, 64, False), (8, 128, "silu", 40, True),
                                                  (0, 256, None, 300, False), (16, 128, None, 17, True)])
def test_a_gemm_entry_sends_its_row_buckets_calls_to_the_hopper_gemm(tuning_table, monkeypatch, tail, bn, gated,
                                                                     m, bias):
    """A "gemm" entry (the Hopper GEMM measured faster than cuBLAS past 16 rows) sends calls of its problem and row
    bucket to its variant and tile width, which match float64 (outputs poisoned with NaN first); a call of another
    bucket, or with a norm prologue, does not take it."""
    from layerforge.codegen.gemv import token_bucket
    n, k = (2 * 1000, 3000) if gated else (2560, 5120)
    tuning.write_entry(tuning_table, "gemm", {"wgmma": 1, "tail": tail, "bn": bn}, arch="sm_90a", dtype="bf16",
                       wtype=None, group=0, gated=gated, n=n, k=k, bucket=token_bucket(m))
    launches = []
    real = linear.launch_gemv
    monkeypatch.setattr(linear, "launch_gemv", lambda *a, **kw: launches.append((kw.get("wgmma"), kw.get("gemm_bn")))
                        or real(*a, **kw))
    gen = seeded_generator("tune-gemm", n, k, m, tail)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
    b = torch.randn(n, generator=gen).to(torch.bfloat16).cuda() if bias else None
    for rows in (m, m - 1 if m > 17 else m + 1):   # two row counts of the bucket
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16).cuda()
        out = torch.full((rows, n // 2 if gated else n), float("nan"), dtype=torch.bfloat16, device="cuda")
        linear.gemv(x, w, b, gated=gated, out=out)
        ref = reference(x, w, b, gated, None)
        assert not torch.isnan(out).any()
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert launches == [(linear.GEMM_TABLE_VARIANTS[tail], bn)] * 2
    x = torch.randn(2 * token_bucket(m) + 1, k, device="cuda", dtype=torch.bfloat16)   # another bucket: torch's
    y = linear.gemv(x, w, b, gated=gated)
    assert len(launches) == 2 and torch.equal(y, linear._torch_product(x, w, b, gated, None))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="the decode-range GEMM needs an sm_90 GPU")
@pytest.mark.parametrize("wtype", ["u4", "i8"])
def test_tune_stream_records_a_split_the_quantised_product_then_runs(tuning_table, wtype):
    """tune_stream's measurements are real times; a recorded split is the plan gemv_quant's 64-row calls then
    run (W packed for it), matching float64 of the dequantised W."""
    from layerforge.codegen.gemm_stream import plan_gemm_stream
    from layerforge.runtime.tune import tune_stream
    n, k, m = 4096, 4096, 64
    group = 128 if wtype == "u4" else 0
    # the plan before tuning: the packaged table's split where it has this problem (LAYERFORGE_TUNING=1), else the rules'
    before = plan_gemm_stream("bf16", n=n, k=k, mt=m, wtype=wtype, group=group).key
    (res,) = tune_stream([("o", n, k, None)], rows=(m,), wtype=wtype, group=128, margin=0.0,
                         candidates=[(1, 1, 2, None), (2, 1, 1, None), (1, 2, 1, 3)], log=lambda s: None)
    assert len(res.timings) >= 2 and all(math.isfinite(t) and t > 0 for t in res.timings.values())
    assert res.torch_us is not None and res.torch_us > 0
    plan = plan_gemm_stream("bf16", n=n, k=k, mt=m, wtype=wtype, group=group)
    if res.recorded:
        assert {f: getattr(plan, f) for f in ("rb", "cw", "stages", "ctas")} == \
            {f: res.best[f] for f in ("rb", "cw", "stages", "ctas")}
    else:   # the rules won: the plan is the one before (a packaged entry of this card's, or the rules'), or the rules'
        # where another card's packaged entry served this card before (tune records the rules' split for this card)
        assert plan.key in (before, plan_gemm_stream("bf16", n=n, k=k, mt=m, wtype=wtype, group=group, tuned=False).key)
    gen = seeded_generator("tune-stream", wtype)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    lin = QuantLinear.from_float(w, group, wtype=wtype, dtype=torch.bfloat16).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    gemv_quant(x, lin.qw, out=out)
    ref = reference(x, dequantize(lin.qw), None, None, None)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


def _quant_reference(x, qw, gated, rows=16384):
    """float64 of x against the dequantised W in slices of `rows` rows, the gated activation over the whole product
    after: an lm_head's W (128256 x 4096) is 4 GB in float64 at once, 70B's gate/up (57344 x 8192) 3.8 GB, more than
    a GPU shared by the suite's workers may have free (the gate/up entry failed beside three workers and passed
    alone: memory, as we read it; its error was not kept)."""
    if qw.n <= rows or qw.perm is not None or qw.wtype not in ("u4", "i8"):
        return reference(x, dequantize(qw), None, gated, None)
    parts = []
    for a in range(0, qw.n, rows):   # u4 / i8: qweight, wgroup and wscale all have a row of W a row
        sl = {f: t[a:a + rows] for f in ("qweight", "wgroup", "wscale") if (t := getattr(qw, f)) is not None}
        parts.append(reference(x, dequantize(dataclasses.replace(qw, **sl, n=min(rows, qw.n - a))), None, None, None))
    return epilogue(torch.cat(parts, dim=-1), None, gated, None)


BIG_ELEMENTS = 100_000_000   # W of more elements: a float64 reference of several GB (70B gate/up 3.8 GB, lm_head 4.2)


@contextlib.contextmanager
def _one_big_at_a_time(big: bool):
    """One big problem at a time across pytest-xdist's workers (a file lock), its memory handed back to the GPU after:
    eight workers each holding a 70B product's float64 reference pass an 80 GB card (13 of the packaged entries
    failed that way under -n 8 on an H100, all passed under -n 3)."""
    if not big:
        yield
        return
    with open(os.path.join(tempfile.gettempdir(), "layerforge-gpu-big-tests.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()   # the caching allocator's blocks back, for the next worker's problem
            fcntl.flock(lock, fcntl.LOCK_UN)


def _packaged_entries():
    """The packaged entries this card takes (codegen/tuning.py): of its arch's, a problem's entry measured on it (or
    naming no card), else another card's; the one read last of each kind."""
    if not torch.cuda.is_available():
        return []
    card, chosen = torch.cuda.get_device_name(), {}
    for e in tuning.read_table(tuning.PACKAGED_TABLE):
        if e["family"] not in ("gemv", "gemv_x8", "gemm_stream", "gemm") or e["arch"].rstrip("a") != "sm_%d%d" % (
                torch.cuda.get_device_capability()) or (e["family"] == "gemm" and not e["split"]["wgmma"]):
            continue
        key, mine = tuning._entry_key(e), e.get("device", "") in (card, "")
        if key not in chosen or mine or not chosen[key][1]:
            chosen[key] = (e, mine)
    return [e for e, _ in chosen.values()]


@pytest.mark.parametrize("entry", _packaged_entries(), ids=lambda e: f"{e['family']}-{e['wtype']}-{e['n']}x{e['k']}-"
                                                              f"{e['bucket']}")
def test_every_packaged_entry_runs_its_split_against_float64(tuning_table, entry, monkeypatch):
    """With the packaged table on (no user table), the product of each entry's problem at its bucket's rows runs the
    entry's split (the planner's key) and matches float64 (bf16: of W; u4 / i8: of the dequantised W; f8e4m3: of it
    and of x quantised as the kernel does; a gemv entry of e4m3 W runs the in-register path, a gemv_x8 one the path
    of x quantised first)."""
    with _one_big_at_a_time(entry["n"] * entry["k"] > BIG_ELEMENTS):
        _check_packaged_entry(entry, monkeypatch)


def _check_packaged_entry(entry, monkeypatch):
    from layerforge.codegen.gemm_stream import plan_gemm_stream
    e, m = entry, entry["bucket"]
    common = dict(n=e["n"], k=e["k"], gated=e["gated"], wtype=e["wtype"], group=e["group"])
    if e["wtype"] == "f8e4m3":
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("W8A8 e4m3 needs an sm_89+ GPU")
        x_first = e["family"] == "gemv_x8"
        monkeypatch.setenv("LAYERFORGE_FP8_QUANT_X_FIRST", "1" if x_first else "0")
        if x_first:
            common.update(x_e4m3=True, x_group=128)
    launches = []
    if e["family"] == "gemm":   # the Hopper GEMM past 16 rows: the call takes the entry's variant and width
        real = linear.launch_gemv
        monkeypatch.setattr(linear, "launch_gemv",
                            lambda *a, **kw: launches.append((kw.get("wgmma"), kw.get("gemm_bn"))) or real(*a, **kw))
    elif e["family"] in ("gemv", "gemv_x8"):
        plan = plan_gemv(e["dtype"], max_m=m, arch=e["arch"], **common)
        assert (plan.rt, plan.warps, plan.stages) == tuple(e["split"][f] for f in ("rt", "warps", "stages"))
    else:
        plan = plan_gemm_stream(e["dtype"], mt=m, arch=e["arch"], **common)
        assert (plan.rb, plan.cw, plan.stages, plan.ctas) == tuple(e["split"][f] for f in ("rb", "cw", "stages", "ctas"))
    gen = seeded_generator("tune-entry", e["family"], e["n"], e["k"], m)
    n, k = e["n"], e["k"]
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(torch.bfloat16).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    n_out = n // 2 if e["gated"] else n
    out = torch.full((m, n_out), float("nan"), dtype=torch.bfloat16, device="cuda")
    if e["wtype"] == "f8e4m3":
        from .test_gemv_fp8 import w8a8_reference
        lin = QuantLinear.from_float(w, e["group"], wtype=e["wtype"], dtype=torch.bfloat16)
        gemv_quant(x, lin.qw, gated=e["gated"], out=out)
        ref = w8a8_reference(x, lin, gated=e["gated"])
    elif e["wtype"]:
        lin = QuantLinear.from_float(w, e["group"], wtype=e["wtype"], dtype=torch.bfloat16)
        gemv_quant(x, lin.qw, gated=e["gated"], out=out)
        ref = _quant_reference(x, lin.qw, e["gated"])
    else:
        linear.gemv(x, w, gated=e["gated"], out=out)
        ref = reference(x, w, None, e["gated"], None)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    if e["family"] == "gemm":
        assert launches == [(linear.GEMM_TABLE_VARIANTS[e["split"]["tail"]], e["split"]["bn"])], launches
