"""W prefetched into L2 ahead of the small-token products' rings (LAYERFORGE_GEMV_L2_PREFETCH, codegen/gemv.py
GemvPlan.prefetch): a prefetch is a hint, so the products with it give the same bits as without it, and both match
float64 (outputs poisoned with NaN first); every weight type, gated and ungated, K and N off the chunks and tiles,
1 to 16 rows, rows past the weight's end never touched."""
import pytest
import torch

from layerforge.runtime import linear
from layerforge.runtime.quant import QuantLinear, dequantize, gemv_quant

from .products import operands, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CASES = [  # (n, k, gated, wtype, group)
    (6144, 4096, None, None, 0), (28672, 4096, "silu", None, 0), (2000, 3000, None, None, 0),
    (6144, 4096, None, "u4", 128), (57344 // 8, 8192, "silu", "u4", 128), (4000, 4224, None, "u4", 64),
    (4096, 14336, None, "i8", 0), (4000, 4128, "gelu_tanh", "i8", 32),
]


def _run(x, w, gated, wtype, group, lin):
    n_out = w.shape[0] // 2 if gated else w.shape[0]
    out = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device="cuda")
    if wtype:
        gemv_quant(x, lin.qw, gated=gated, out=out)
    else:
        linear.gemv(x, w, gated=gated, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_prefetch_gives_the_same_bits_and_matches_float64(case, m, monkeypatch):
    n, k, gated, wtype, group = CASES[case]
    x, w, _, _ = operands("gemv-prefetch", m, n, k, torch.bfloat16, gated, False, False)
    lin = QuantLinear.from_float(w, group, wtype=wtype, dtype=torch.bfloat16) if wtype else None
    outs = []
    for on in ("0", "1"):
        monkeypatch.setenv("LAYERFORGE_GEMV_L2_PREFETCH", on)
        outs.append(_run(x, w, gated, wtype, group, lin))
    assert any(key[-1] for key in linear._KERNELS), "no launcher was built with the prefetch on"
    off, on = outs
    assert not torch.isnan(on).any()
    assert torch.equal(off, on)
    ref = reference(x, dequantize(lin.qw) if wtype else w, None, gated, None)
    assert ((on.double() - ref).norm() / ref.norm()).item() < 1e-2
