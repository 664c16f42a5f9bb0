"""Row layers with reductions split over a thread block cluster at few rows (LAYERFORGE_ROW_CLUSTER=1, and by
default from runtime/layers.py ROW_CLUSTER_DEFAULT_WIDTH; sm_90;
codegen/row.py _cluster_shape, runtime/layers.py ROW_CLUSTER_MAX_ROWS) against the float64 reference evaluator,
outputs poisoned first: the per-token FP8 quantisers (their q and scales as tests/gpu/test_row_quant8.py holds
them, and bit for bit the one-CTA kernel's, whose amax is the same exact max), norms and softmax (a sum's order
differs from the one-CTA kernel's: the row tolerance); the cluster kernel ran (its launch cached), and past
ROW_CLUSTER_MAX_ROWS rows the one-CTA kernel."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime import layers
from layerforge.runtime.layers import LayerModule

from ..seeding import seeded_generator
from .test_row_kernels import check_close, poisoned
from .test_row_quant8 import check_quantised, inputs
from .test_row_quant8 import poisoned as poisoned_fp8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
    reason="thread block clusters need an sm_90 GPU")]


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def cluster_used(mod) -> bool:
    return any(k[2:3] == ("cluster",) and v is not None for k, v in mod._launches.items())


@pytest.mark.parametrize("rows", [1, 5, 32, 33])
@pytest.mark.parametrize("name,w", [("swiglu_fp8_per_token", 14336), ("rms_norm_fp8_per_token", 4096),
                                    ("rms_norm_fp8_per_token", 8200), ("swiglu_fp8_per_token", 5000)])
def test_fp8_quantisers_on_a_cluster(monkeypatch, prog, name, w, rows):
    dims = {"F": w} if name.startswith("swiglu") else {"H": w}
    mod = LayerModule(prog.specialise(name, dtype="bf16", **dims), device="cuda")
    gen = seeded_generator("row-cluster-fp8", name, w, rows)
    x = inputs(name, rows, w, "bf16", gen)
    tensors = {mod.input_names[0]: x}
    if name.startswith("rms"):
        with torch.no_grad():
            mod.gamma.copy_((torch.randn(w, generator=gen) * 0.5 + 1).to(torch.bfloat16))
        tensors["gamma"] = mod.gamma
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "0")
    q1, s1 = mod(x)
    assert not cluster_used(mod)
    monkeypatch.delenv("LAYERFORGE_ROW_CLUSTER", raising=False)   # the default: clusters from the measured width
    qd, sd = mod(x)
    by_default = rows <= layers.ROW_CLUSTER_MAX_ROWS and w >= layers.ROW_CLUSTER_DEFAULT_WIDTH
    assert cluster_used(mod) == by_default
    if not by_default or name.startswith("swiglu"):   # the one-CTA kernel, or the same max of the same values
        assert torch.equal(qd.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(sd, s1)
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "1")
    q_ref, s_ref = lf.evaluate(mod.function, {**tensors, **mod._scalars}, precision="float64")
    out = poisoned_fp8(rows, w)
    q, s = mod(x, out=out)
    torch.cuda.synchronize()
    assert cluster_used(mod) == (rows <= layers.ROW_CLUSTER_MAX_ROWS)
    check_quantised(q, s, q_ref, s_ref)
    if name.startswith("swiglu"):   # one max of the same values: the same bytes as one CTA a row
        assert torch.equal(q.view(torch.uint8), q1.view(torch.uint8)) and torch.equal(s, s1)


@pytest.mark.parametrize("rows", [1, 7, 32])
@pytest.mark.parametrize("name,dims", [("rms_norm", dict(H=8192)), ("rms_norm", dict(H=4104)),
                                       ("add_rms_norm", dict(H=8192)), ("layer_norm", dict(H=8192)),
                                       ("softmax_rows", dict(H=32768))])
def test_norms_and_softmax_on_a_cluster(monkeypatch, prog, name, dims, rows):
    monkeypatch.setenv("LAYERFORGE_ROW_CLUSTER", "1")
    mod = LayerModule(prog.specialise(name, dtype="bf16", **dims), device="cuda")
    gen = seeded_generator("row-cluster", name, rows, *dims.values())
    fn = mod.function
    args = []
    for pname in mod.input_names:
        p = next(q for q in fn.params if q.name == pname)
        shape = [rows if str(d) == "N" else int(d) for d in p.shape]
        args.append((torch.randn(*shape, generator=gen) * 2).to(p.dtype.torch).cuda())
    tensors = dict(zip(mod.input_names, args))
    for wname in getattr(mod, "_weights", {}):   # the module's own weights: fresh values
        t = getattr(mod, mod._weights[wname])
        with torch.no_grad():
            t.copy_((torch.randn(t.shape, generator=gen) * 0.5 + 1).to(t.dtype))
        tensors[wname] = t
    ref = lf.evaluate(fn, {**tensors, **mod._scalars}, precision="float64")
    outs = tuple(poisoned(torch.empty(r.shape, dtype=o.dtype.torch, device="cuda")) for r, o in zip(ref, fn.outputs))
    got = mod(*args, out=outs)
    got = got if isinstance(got, tuple) else (got,)
    torch.cuda.synchronize()
    assert cluster_used(mod)
    for i, (g, r) in enumerate(zip(got, ref)):
        check_close(f"{name} {dims} rows={rows} out {i}", g, r, "bf16")
