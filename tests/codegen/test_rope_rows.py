"""The stdlib `rope` / `rope_llama3` row layers: frequencies from dsl/numerics folded into the
kernel as a table (rope_freqs), one angle per element, compiled without spills."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.plan import RowPlan
from layerforge.dsl.errors import DSLError
from layerforge.dsl.ir import Op
from layerforge.dsl.numerics import Llama3Scaling, rope_inv_freq
from layerforge.runtime import nvrtc


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def _table(layer):
    tables = [n for n in layer.function.nodes() if n.op is Op.TABLE]
    assert len(tables) == 1
    return tables[0].arg


@pytest.mark.parametrize("neox", [True, False])
def test_rope_freqs_is_the_numerics_table_per_channel(prog, neox):
    layer = prog.specialise("rope", D=128, dtype="bf16", rotary_dim=64, theta=500000.0, neox=neox)
    inv = rope_inv_freq(500000.0, 64).tolist()
    want = inv + inv if neox else [f for f in inv for _ in range(2)]
    assert list(_table(layer)) == want


def test_rope_llama3_takes_llama3_frequencies(prog):
    layer = prog.specialise("rope_llama3", D=128, dtype="bf16", rope_factor=32.0)
    inv = rope_inv_freq(500000.0, 128, Llama3Scaling(32.0, 1.0, 4.0, 8192)).tolist()
    assert list(_table(layer)) == inv + inv


@pytest.mark.parametrize("name, kw", [("rope", dict(D=128)), ("rope", dict(D=128, rotary_dim=64, neox=False)),
                                      ("rope_llama3", dict(D=128)), ("rope", dict(D=64))])
def test_rope_rows_compute_one_angle_per_element_and_no_pow(prog, name, kw):
    plan = RowPlan(layer=prog.specialise(name, dtype="bf16", **kw), arch="sm_90")
    src = plan.source()
    assert "powf(" not in src and "static const float lf_table0[" in src
    # one frequency, one cos and one sin per rotated element (not one per concat branch)
    angles = src.count(" = lf_table0[")
    assert angles > 0 and src.count("cosf(") == angles and src.count("sinf(") == angles
    res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions("sm_90"))
    assert all(kr.spill_stores == 0 for kr in res.resources.values())


def test_rope_freqs_rejects_types_with_an_attention_factor():
    src = ("dims D\ndynamic N\n"
           "layer r(x: f32[N, D]) -> f32[N, D] {\n"
           "    return x * rope_freqs(D, type = yarn, factor = 4.0, original_max_position = 4096)\n}\n")
    with pytest.raises(DSLError, match=r"blk.lf:4:16: .*attention factor"):
        lf.Program.from_source(src, "blk.lf").specialise("r", D=8)


def test_rope_layer_matches_the_float64_rotation_on_the_cpu(prog):
    """The reference run of the layer (the CPU path of its module) against the rotation by
    dsl/numerics' frequencies in float64."""
    from layerforge.dsl.evaluator import evaluate
    layer = prog.specialise("rope", D=64, dtype="f32")
    pos = torch.tensor([0, 1, 7, 2047, 100000], dtype=torch.int32)
    x = torch.randn(len(pos), 3, 64)
    (got,) = evaluate(layer.function, {"x": x, "pos": pos}, precision="float64")
    x = x.double()
    ang = pos.double()[:, None, None] * rope_inv_freq(10000.0, 64)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., :32], x[..., 32:]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
