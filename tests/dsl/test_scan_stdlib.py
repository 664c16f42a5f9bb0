"""The standard library's Mamba layers (dsl/stdlib/ssm.lf) against runtime/scan.py's float64
references (the CPU path of the kernels' API): the conv with its carried state, the selective
scan from a carried state, the decode steps; and the states carried by the DSL layers alone:
a prefill of L then n decode steps equals a prefill of L + n."""
from __future__ import annotations

import pytest
import torch

import layerforge
from layerforge.dsl.evaluator import evaluate, evaluate_states
from layerforge.runtime import scan as ref

F64 = torch.float64
B, FD, NS, KW = 2, 6, 4, 4


@pytest.fixture(scope="module")
def lib():
    return layerforge.stdlib()


def layer(lib, name, dtype="f32"):
    return lib.specialise(name, dtype=dtype, F=FD, NS=NS, KW=KW).function


def scan_inputs(length, dtype=torch.float32):
    return dict(u=torch.randn(B, FD, length).to(dtype), delta=(torch.randn(B, FD, length) * 0.5).to(dtype),
                A=-torch.exp(torch.randn(FD, NS) * 0.5), Bm=torch.randn(B, NS, length).to(dtype),
                Cm=torch.randn(B, NS, length).to(dtype), Dskip=torch.randn(FD), z=torch.randn(B, FD, length).to(dtype),
                dt_bias=torch.randn(FD) * 0.1, h=torch.randn(B, FD, NS))


def reference_scan(i, h):
    d = {k: v.double() for k, v in i.items()}
    return ref.selective_scan(d["u"], d["delta"], d["A"], d["Bm"], d["Cm"], d["Dskip"], d["z"], d["dt_bias"],
                              initial_state=h.double(), return_final_state=True)


def test_selective_scan_matches_the_runtime_reference(lib):
    i = scan_inputs(13)
    (y,), states = evaluate_states(layer(lib, "selective_scan"), i, precision="float64")
    want_y, want_h = reference_scan(i, i["h"])
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states["h"], want_h, rtol=1e-12, atol=1e-12)


def test_selective_scan_in_bf16_rounds_its_output_once_more(lib):
    i = scan_inputs(7, torch.bfloat16)
    (y,) = evaluate(layer(lib, "selective_scan", "bf16"), dict(i, h=i["h"].clone()))
    want_y, _ = reference_scan(i, i["h"])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want_y, rtol=2e-2, atol=2e-2)


def test_state_update_matches_the_runtime_reference(lib):
    i = {k: (v[..., 0].contiguous() if k in ("u", "delta", "Bm", "Cm", "z") else v)
         for k, v in scan_inputs(1).items()}
    x, dt = i.pop("u"), i.pop("delta")
    (y,), states = evaluate_states(layer(lib, "selective_state_update"), dict(i, x=x, dt=dt), precision="float64")
    h = i["h"].double().clone()
    want = ref.selective_state_update(h, x.double(), dt.double(), i["A"].double(), i["Bm"].double(),
                                      i["Cm"].double(), i["Dskip"].double(), i["z"].double(), i["dt_bias"].double())
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states["h"], h, rtol=1e-12, atol=1e-12)


def test_mamba_conv_matches_the_runtime_reference(lib):
    x, w, b, conv = torch.randn(B, FD, 9), torch.randn(FD, KW), torch.randn(FD), torch.randn(B, FD, KW - 1)
    (y,), states = evaluate_states(layer(lib, "mamba_conv"), dict(x=x, w=w, b=b, conv=conv), precision="float64")
    want_y, want_s = ref.causal_conv1d(x.double(), w.double(), b.double(), initial_state=conv.double(),
                                       return_final_state=True)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states["conv"], want_s, rtol=0, atol=0)


def test_conv_step_matches_the_runtime_update(lib):
    x, w, b, conv = torch.randn(B, FD), torch.randn(FD, KW), torch.randn(FD), torch.randn(B, FD, KW - 1)
    (y,), states = evaluate_states(layer(lib, "mamba_conv_step"), dict(x=x, w=w, b=b, conv=conv), precision="float64")
    window = torch.cat([torch.zeros(B, FD, 1, dtype=F64), conv.double()], -1)   # the runtime's state is K wide
    want = ref.causal_conv1d_update(x.double(), window, w.double(), b.double())
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(states["conv"], window[..., 1:], rtol=0, atol=0)


def test_prefill_then_decode_steps_equal_a_longer_prefill(lib):
    length, steps = 10, 3
    i = scan_inputs(length + steps)
    x, w, b = torch.randn(B, FD, length + steps), torch.randn(FD, KW), torch.randn(FD)
    conv0, h0 = torch.zeros(B, FD, KW - 1), i["h"].clone()
    (whole_c,) = evaluate(layer(lib, "mamba_conv"), dict(x=x, w=w, b=b, conv=conv0.clone()))
    (whole_y,) = evaluate(layer(lib, "selective_scan"), dict(i, h=h0.clone()))
    conv, h = conv0.clone(), h0.clone()
    cut = {k: (v[..., :length].contiguous() if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in i.items()}
    (pre_c,) = evaluate(layer(lib, "mamba_conv"), dict(x=x[..., :length].contiguous(), w=w, b=b, conv=conv))
    (pre_y,) = evaluate(layer(lib, "selective_scan"), dict(cut, h=h))
    ys, cs = [pre_y], [pre_c]
    for t in range(length, length + steps):
        (c,) = evaluate(layer(lib, "mamba_conv_step"), dict(x=x[..., t].contiguous(), w=w, b=b, conv=conv))
        step = {k: v[..., t].contiguous() for k, v in i.items() if k in ("Bm", "Cm", "z")}
        (y,) = evaluate(layer(lib, "selective_state_update"),
                        dict(step, x=i["u"][..., t].contiguous(), dt=i["delta"][..., t].contiguous(), A=i["A"],
                             Dskip=i["Dskip"], dt_bias=i["dt_bias"], h=h))
        ys.append(y[..., None])
        cs.append(c[..., None])
    torch.testing.assert_close(torch.cat(cs, -1), whole_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat(ys, -1), whole_y, rtol=1e-5, atol=1e-5)
