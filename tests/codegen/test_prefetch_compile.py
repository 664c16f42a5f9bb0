"""The L2 prefetch kernel (codegen/prefetch.py) renders and compiles for sm_80, sm_89 and sm_90 without spills: bulk
prefetches of whole 16-byte pieces on sm_90, 128-byte lines before; bad plans are clear errors."""
import pytest

from layerforge.codegen.prefetch import L2PrefetchPlan, plan_l2_prefetch

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.mark.parametrize("arch,kw", [("sm_80", {}), ("sm_89", dict(lines=16, threads=128)), ("sm_90", {}),
                                      ("sm_90", dict(chunk=4096, threads=256))])
def test_prefetch_compiles_without_spills(arch, kw):
    plan = plan_l2_prefetch(arch=arch, **kw)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(plan.arch))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0, kr
    src = plan.source()
    bulk = arch == "sm_90"
    assert plan.bulk == bulk and ("cp.async.bulk.prefetch.L2.global" in src) == bulk
    assert ("prefetch.global.L2 [" in src) != bulk
    if bulk:   # the runs stop at the last whole 16-byte piece: the bulk form never reaches past the tensor
        assert "nbytes & ~15LL" in src and f"min((long long){plan.chunk}, whole - off)" in src
    assert plan.abi.block == (plan.threads, 1, 1) and [a.name for a in plan.abi.args] == ["src", "nbytes"]


def test_prefetch_grid_covers_the_bytes_and_caps_at_four_ctas_an_sm():
    bulk, lines = plan_l2_prefetch(arch="sm_90"), plan_l2_prefetch(arch="sm_80")
    assert bulk.key == "l2_prefetch_bulk_c32768_sm90" and lines.key == "l2_prefetch_lines8_sm80"
    assert bulk.blocks(1, 132) == 1 and bulk.blocks(32 * 32768, 132) == 1 and bulk.blocks(32 * 32768 + 1, 132) == 2
    assert bulk.blocks(26_214_400, 132) == 25                  # Mamba2-2.7B's out_proj W: a run a thread
    assert bulk.blocks(10 ** 10, 132) == 4 * 132                # past that the threads loop
    assert lines.blocks(26_214_400, 108) == 4 * 108


@pytest.mark.parametrize("kw,match", [(dict(arch="sm_75"), "sm_80"), (dict(arch="sm_90", threads=48), "threads"),
                                      (dict(arch="sm_90", chunk=24), "chunk"),
                                      (dict(arch="sm_90", chunk=1 << 21), "chunk"),
                                      (dict(arch="sm_80", lines=3), "lines")])
def test_bad_prefetch_plans_are_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        L2PrefetchPlan(**kw)
