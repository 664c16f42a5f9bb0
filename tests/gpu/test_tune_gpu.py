"""`layerforge tune` on the GPU (runtime/tune.py): the splits of a product are timed beside the rules' plan on
cold weights, the winner goes to the table, and the planner's product then runs the recorded split and matches
float64 (outputs poisoned with NaN first), for bf16 and u4 weights."""
import math

import pytest
import torch

from layerforge.codegen import tuning
from layerforge.codegen.gemv import plan_gemv
from layerforge.runtime import linear, quant
from layerforge.runtime.quant import QuantLinear, dequantize, gemv_quant
from layerforge.runtime.tune import tune_products

from ..seeding import seeded_generator
from .products import reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture
def table(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFORGE_TUNING", "1")
    monkeypatch.setenv("LAYERFORGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LAYERFORGE_TUNING_TABLE", raising=False)
    monkeypatch.setattr(linear, "_KERNELS", {})   # launchers made before the table: not reused
    monkeypatch.setattr(quant, "_DEQUANT", {})
    tuning.clear_cache()
    yield tuning.user_table_path()
    tuning.clear_cache()


@pytest.mark.parametrize("wtype", [None, "u4"])
def test_tune_records_the_fastest_split_and_the_product_runs_it(table, wtype):
    n, k, m = 3000, 2048, 9
    arch = "sm_%d%d" % torch.cuda.get_device_capability()
    rules = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype=wtype, group=128 if wtype else 0, tuned=False)
    cands = [(1, 2, 3), (2, 4, 2), (1, 4, 4)]
    (res,) = tune_products([("p", n, k, None)], tokens=(m,), wtype=wtype, group=128, margin=0.0, candidates=cands,
                           log=lambda s: None)
    assert res.bucket == 16 and len(res.timings) >= 2
    assert all(math.isfinite(t) and t > 0 for t in res.timings.values())
    assert res.best_us == min(res.timings.values())
    plan = plan_gemv("bf16", n=n, k=k, max_m=16, arch=arch, wtype=wtype, group=128 if wtype else 0)
    assert ((plan.rt, plan.warps, plan.stages) == (res.best["rt"], res.best["warps"], res.best["stages"])) \
        == res.recorded
    if not res.recorded:
        assert plan.key == rules.key
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
