"""Rows with reductions split over the CTAs of a thread block cluster (sm_90; codegen/row.py _cluster_shape), for
few-row calls of wide rows (runtime/layers.py, LAYERFORGE_ROW_CLUSTER): the plan and its ABI, NVRTC compiles
without spills with the cluster's barriers and distributed-shared-memory loads, and, by running the generated
column statements in Python for every (CTA of the cluster, thread), each output element of a row stored exactly
once and every input column of the row read (each CTA's reductions cover its own span: together the row)."""
import pytest

import layerforge as lf
from layerforge.codegen.plan import LoweringError, RowPlan, plan_layer, row_cluster_size

from .test_row_split import accesses

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def plan(prog, name, cluster, dtype="bf16", arch="sm_90", vec_bytes=16, **dims):
    return plan_layer(prog.specialise(name, dtype=dtype, **dims), arch, vec_bytes=vec_bytes, cluster=cluster)


# (layer, dims, input widths, output widths: a per-row output is width 1)
CASES = [
    ("swiglu_fp8_per_token", dict(F=14336), [2 * 14336], [14336, 1]),
    ("swiglu_fp8_per_token", dict(F=28672), [2 * 28672], [28672, 1]),
    ("rms_norm_fp8_per_token", dict(H=4096), [4096, 4096], [4096, 1]),
    ("rms_norm_fp8_per_token", dict(H=5000), [5000, 5000], [5000, 1]),   # spans of 8-element chunks, a tail
    ("rms_norm", dict(H=8192), [8192, 8192], [8192]),
    ("add_rms_norm", dict(H=4104), [4104, 4104, 4104], [4104, 4104]),
    ("layer_norm", dict(H=8192), [8192, 8192, 8192], [8192]),            # mean, then variance: two reductions
    ("softmax_rows", dict(H=32768), [32768], [32768]),                    # max, then sum
]


@pytest.mark.parametrize("cluster", [4, 8])
@pytest.mark.parametrize("name,dims,ins,outs", CASES)
def test_cluster_rows_store_each_element_once_and_read_the_whole_row(prog, name, dims, ins, outs, cluster):
    p = plan(prog, name, cluster, **dims)
    k = p.lowered()
    assert (k.split, k.cluster, k.rpb) == (cluster, cluster, 1) and k.tpr >= 64
    stores, loads = accesses(k.body, k.tpr, k.split)
    assert sorted(stores) == [f"o_{i}" for i in range(len(outs))]
    for i, w in enumerate(outs):
        assert sorted(stores[f"o_{i}"]) == list(range(w)), f"output {i}: not each of its {w} columns once"
    params = [q for q in p.layer.function.params if q.kind == "tensor"]
    assert [int(q.shape[-1]) for q in params] == ins
    for q, w in zip(params, ins):   # (a row-broadcast weight: its columns, read by every row's CTAs)
        assert set(loads[f"p_{q.name}"]) == set(range(w)), f"{q.name}: not every column read"
    # one cluster combine a reduction, then the barrier before the CTAs leave
    phases = sum(line.startswith("float acc") or line.startswith("long long acc") for line in k.body)
    assert sum("lf_cluster_reduce<" in line for line in k.body) == phases >= 1
    assert k.body[-1] == "lf_cluster_barrier();"


@pytest.mark.parametrize("name,dims,ins,outs", CASES[:5] + CASES[6:])
def test_cluster_rows_compile_without_spills(prog, name, dims, ins, outs):
    p = plan(prog, name, 8, **dims)
    res = nvrtc.compile_cuda(p.source(), p.kernel_name, nvrtc.CompileOptions("sm_90"), want_ptx=True)
    kr = res.resources[p.kernel_name]
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, (p.key, kr)
    assert ".reqnctapercluster 8, 1, 1" in res.ptx
    assert "mapa.shared::cluster" in res.ptx and "ld.shared::cluster" in res.ptx
    assert "barrier.cluster.arrive.release" in res.ptx and "barrier.cluster.wait.acquire" in res.ptx


def test_cluster_is_a_plan_field(prog):
    """Key, grid (rows x the cluster), block and signature: the plain plan's arguments, so the runtime swaps the
    kernels by row count without touching its argument list."""
    p, one = plan(prog, "swiglu_fp8_per_token", 8, F=14336), plan(prog, "swiglu_fp8_per_token", 1, F=14336)
    assert p.key == "swiglu_fp8_per_token_f14336_bf16_c8_sm90" and one.key == "swiglu_fp8_per_token_f14336_bf16_sm90"
    assert p.abi.grid == ("rows * 8", "1", "1") and p.abi.grid_for(rows=3) == (24, 1, 1)
    assert p.abi.signature == one.abi.signature and p.abi.problem == ("rows",)
    src = p.source()
    assert "__cluster_dims__(8, 1, 1) __launch_bounds__(" in src and "__cluster_dims__" not in one.source()


def test_cluster_refusals(prog):
    with pytest.raises(LoweringError, match="needs sm_90"):
        plan(prog, "rms_norm", 8, arch="sm_80", H=8192)
    with pytest.raises(LoweringError, match="rows with reductions"):
        plan(prog, "swiglu", 8, F=14336)
    with pytest.raises(LoweringError, match="top-k"):
        plan(prog, "moe_route", 4, E=8192, k=2)
    with pytest.raises(LoweringError, match="2, 4 or 8"):
        plan(prog, "rms_norm", 3, H=8192)


@pytest.mark.parametrize("name,dims,arch,size", [
    ("swiglu_fp8_per_token", dict(F=14336), "sm_90", 8), ("rms_norm_fp8_per_token", dict(H=4096), "sm_90", 4),
    ("rms_norm", dict(H=8192), "sm_90", 8), ("rms_norm", dict(H=2048), "sm_90", 1),    # narrow: one CTA a row
    ("swiglu", dict(F=14336), "sm_90", 1),                                           # no reduction: plain split
    ("rms_norm", dict(H=8192), "sm_80", 1), ("moe_route", dict(E=8192, k=2), "sm_90", 1),
])
def test_row_cluster_size(prog, name, dims, arch, size):
    p = plan_layer(prog.specialise(name, dtype="bf16", **dims), arch)
    assert isinstance(p, RowPlan) and row_cluster_size(p) == size


def test_row_cluster_size_above_a_callers_width(prog):
    """The runtime's default threshold (ROW_CLUSTER_DEFAULT_WIDTH): swiglu_fp8 F 14336 still splits over 8, an
    8192-wide RMSNorm stays on one CTA; a threshold under ROW_CLUSTER_MIN_WIDTH changes nothing."""
    from layerforge.runtime.layers import ROW_CLUSTER_DEFAULT_WIDTH
    wide = plan_layer(prog.specialise("swiglu_fp8_per_token", dtype="bf16", F=14336), "sm_90")
    norm = plan_layer(prog.specialise("rms_norm", dtype="bf16", H=8192), "sm_90")
    assert row_cluster_size(wide, ROW_CLUSTER_DEFAULT_WIDTH) == 8 and row_cluster_size(norm, ROW_CLUSTER_DEFAULT_WIDTH) == 1
    assert row_cluster_size(norm, 1024) == row_cluster_size(norm) == 8


def test_row_cluster_switch(monkeypatch):
    """LAYERFORGE_ROW_CLUSTER: unset, clusters from the measured width; 1 every row row_cluster_size splits; 0
    none; a misspelt value an error."""
    from layerforge.codegen.plan import ROW_CLUSTER_MIN_WIDTH
    from layerforge.runtime.layers import ROW_CLUSTER_DEFAULT_WIDTH, row_cluster_min_width
    monkeypatch.delenv("LAYERFORGE_ROW_CLUSTER", raising=False)
    assert row_cluster_min_width() == ROW_CLUSTER_DEFAULT_WIDTH and 8192 < ROW_CLUSTER_DEFAULT_WIDTH <= 14336
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "1")
    assert row_cluster_min_width() == ROW_CLUSTER_MIN_WIDTH
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "0")
    assert row_cluster_min_width() is None
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "maybe")
    with pytest.raises(ValueError, match="LAYERFORGE_ROW_CLUSTER"):
        row_cluster_min_width()
