"""A DSL layer with state parameters as a LayerModule: the state is a forward() argument the call
rewrites in place (CPU: the reference evaluator; no row kernel is ever planned for it, since one
would not write the state back: the scan family serves the layers it matches)."""
from __future__ import annotations

import pytest
import torch

from layerforge.codegen.plan import plan_layer
from layerforge.codegen.row import LoweringError
from layerforge.dsl.program import Program
from layerforge.runtime.layers import LayerModule
from layerforge.runtime.scan import causal_conv1d_update, selective_state_update


def test_state_update_layer_rewrites_its_state():
    layer = Program.stdlib().specialise("selective_state_update", dtype="f32", F=8, NS=4)
    with pytest.raises(LoweringError, match="state h"):
        plan_layer(layer, "sm_90")
    m = LayerModule(layer)
    # the scan family serves it (codegen/scan_lower.py): CUDA tensors run the state-update kernel
    assert m.kernel_reason is None and m.input_names[-1] == "h"
    g = torch.Generator().manual_seed(0)
    A, D, dtb = -torch.rand(8, 4, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    m.load_state_dict({"A": A, "Dskip": D, "dt_bias": dtb})
    x, dt, z = (torch.randn(2, 8, generator=g) for _ in range(3))
    Bm, Cm = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    h = torch.randn(2, 8, 4, generator=g)
    h_ref, h_old = h.clone(), h.clone()
    y = m(x, dt, Bm, Cm, z, h)
    y_ref = selective_state_update(h_ref, x, dt, A, Bm, Cm, D, z, dtb)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(h, h_old)


def test_conv_step_layer_rewrites_its_state():
    m = LayerModule(Program.stdlib().specialise("mamba_conv_step", dtype="f32", F=6, KW=4))
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    m.load_state_dict({"weight": w, "bias": b})
    conv = torch.randn(3, 6, 3, generator=g)
    ref_state = torch.cat([torch.zeros(3, 6, 1), conv], -1)   # the runtime's decode state: K wide, newest last
    for _ in range(3):
        x = torch.randn(3, 6, generator=g)
        y = m(x, conv)
        y_ref = causal_conv1d_update(x, ref_state, w, b, activation="silu")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv, ref_state[..., 1:], rtol=0, atol=0)
