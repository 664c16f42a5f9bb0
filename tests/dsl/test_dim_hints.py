"""The hint for an undeclared dim names both declarations, the likelier first: a tensor's
leading dim (where token counts go) suggests `dynamic`, another position `dims`."""
import pytest

import layerforge as lf


def hint_for(text):
    with pytest.raises(lf.DSLError) as e:
        lf.loads(text, "f.lf", with_stdlib=False)
    (d, *_) = e.value.diagnostics
    assert d.message.startswith("unknown dim")
    return d.hint


def test_leading_dim_suggests_dynamic_first():
    h = hint_for("dims H\nlayer f(x: f32[M, H]) -> f32[M, H] {\n    return x\n}\n")
    assert h.startswith("declare it with `dynamic M`") and "`dims M`" in h


def test_leading_dim_expression_suggests_dynamic_first():
    h = hint_for("dims H\nlayer f(x: f32[2*M, H]) -> f32[2*M, H] {\n    return x\n}\n")
    assert h.startswith("declare it with `dynamic M`")


def test_other_dims_suggest_dims_first():
    h = hint_for("dynamic N\nlayer f(x: f32[N, K]) -> f32[N, K] {\n    return x\n}\n")
    assert h.startswith("declare it with `dims K`") and "`dynamic K`" in h
    h = hint_for("layer f(w: f32[K]) -> f32[K] {\n    return w\n}\n")
    assert h.startswith("declare it with `dims K`")
