"""Layers with scans, causal convolutions and state lower to the scan family (codegen/scan_lower.py):
each of dsl/stdlib/ssm.lf's four Mamba layers maps to the plan runtime/scan.py launches for the
same sizes, and LayerModule's CUDA path launches exactly that plan (the launcher is intercepted
here: no GPU); a layer written the same way under other names and operand orders lowers too; a
layer that differs is a LoweringError naming what differs at its source position."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.codegen.families import plans_for_layer
from layerforge.codegen.plan import LoweringError, plan_layer
from layerforge.codegen.scan import not_lowered_reason
from layerforge.codegen.scan_lower import ScanPattern, has_scan, match_scan
from layerforge.runtime import scan as runtime_scan
from layerforge.runtime.layers import LayerModule

F, NS, KW = 24, 8, 4
CONV = {"F": F, "KW": KW}
SSM = {"F": F, "NS": NS}


@pytest.fixture(scope="module")
def lib():
    return lf.stdlib()


def layer(lib, name, dtype="bf16"):
    return lib.specialise(name, dtype=dtype, **(CONV if "conv" in name else SSM))


# ---- the stdlib's layers and the plans the runtime launches ----------------------------------
EXPECTED = {
    "mamba_conv": ("conv", "scan_conv_d24_k4_bf16_wbf16_bbf16_silu_init_final_sm90"),
    "mamba_conv_step": ("conv_step", "scan_conv_update_d24_k4_bf16_sbf16_wbf16_bbf16_silu_v_sm90"),
    "selective_scan": ("selective_scan", "selective_scan_d24_n8_bf16_af32_skipf32_bf32_z_sp_init_final_sm90"),
    "selective_state_update": ("state_update", "selective_state_update_d24_n8_bf16_af32_skipf32_bf32_z_sp_sm90"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_stdlib_layer_matches_its_kernel(lib, name):
    kind, key = EXPECTED[name]
    lay = layer(lib, name)
    p = match_scan(lay)
    assert p.kind == kind and p.channels == F and p.dtype == "bf16"
    assert p.plan("sm_90").key == key
    assert not_lowered_reason(lay) is None and has_scan(lay.function)
    plans = plans_for_layer(lay, "sm_90")
    assert key in [q.key for q in plans]
    with pytest.raises(LoweringError, match="not a row kernel"):   # never a row kernel: it would not write the state
        plan_layer(lay, "sm_90")


def test_selective_scan_lists_every_chunk_tiling_the_runtime_picks(lib):
    p = match_scan(layer(lib, "selective_scan"))
    keys = [q.key for q in p.plans("sm_90")]
    assert [k.split("_final_")[1] for k in keys] == ["t128x1_sm90", "t128x2_sm90", "t128x4_sm90", "sm90"]
    assert p.plan("sm_90", length=13).key == keys[0] and p.plan("sm_90", length=8192).key == keys[-1]
    assert (p.state, p.a_dtype, p.d_dtype, p.bias_dtype, p.gate, p.softplus, p.initial, p.final) == \
        (NS, "f32", "f32", "f32", True, True, True, True)
    assert dict(p.operands) == {"u": "u", "delta": "delta", "A": "A", "B": "Bm", "C": "Cm", "D": "Dskip", "z": "z",
                                "delta_bias": "dt_bias", "state": "h"}


def _inputs(m: LayerModule, lay, batch=2, length=13):
    """Random CPU tensors for every forward() argument of a module (weights stay the module's)."""
    g = torch.Generator().manual_seed(0)
    sizes = {"B": batch, "S": length}
    out = []
    for p in lay.function.params:
        if p.name in m.input_names:
            shape = [int(d.subs({s: sizes[s.name] for s in d.free_symbols})) if hasattr(d, "free_symbols") else int(d)
                     for d in p.shape]
            out.append(torch.randn(shape, generator=g).to(p.dtype.torch))
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layer_module_launches_the_lowered_plan(lib, name, monkeypatch):
    """The module's CUDA path, run with the launcher intercepted: the plan it loads is the
    lowering's, with every argument the plan's ABI lists, and the state written back in place."""
    lay = layer(lib, name)
    m = LayerModule(lay, arch="sm_90")
    assert m.kernel_reason is None
    launched = []

    def launcher(key, device, make_plan, cache):
        plan = make_plan("sm_90")

        def launch(grid, argv):
            launched.append((plan, grid, argv))
            for a, v in zip(plan.abi.args, argv):   # outputs the kernel writes: a known value
                if a.role == "output" and isinstance(v, torch.Tensor):
                    v.fill_(0.5)
        return launch
    monkeypatch.setattr(runtime_scan, "_use_kernel", lambda t: True)
    monkeypatch.setattr(runtime_scan, "_launcher", launcher)
    args = _inputs(m, lay)
    tensors = dict(zip(m.input_names, args))
    for n, attr in m._weights.items():
        tensors[n] = getattr(m, attr)
    state = tensors[dict(m._scan.operands)["state"]]
    y = m._run_scan(tensors, None)
    ((plan, grid, argv),) = launched
    length = args[0].shape[-1]
    assert plan.key == m._scan.plan("sm_90", length=length).key
    assert len(argv) == len(plan.abi.args)
    assert y.dtype == torch.bfloat16 and torch.all(y == 0.5)
    assert torch.all(state == 0.5)   # the kernel's new state, copied into the caller's tensor


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_module_dispatch_computes_the_layer(lib, name):
    """The module's scan path (operand roles, the decode conv run on a K-wide copy of its state,
    the state written back) over runtime/scan.py's references (CPU tensors) equals the DSL's own
    float64 evaluation: output and new state."""
    from layerforge.dsl.evaluator import evaluate_states
    lay = layer(lib, name, "f32")
    m = LayerModule(lay)
    assert m.kernel_reason is None
    g = torch.Generator().manual_seed(3)
    for n, attr in m._weights.items():
        v = torch.randn(getattr(m, attr).shape, generator=g) * 0.5
        getattr(m, attr).data.copy_(-torch.exp(v) if n == "A" else v)
    tensors = dict(zip(m.input_names, _inputs(m, lay, length=5)))
    tensors.update({n: getattr(m, attr) for n, attr in m._weights.items()})
    (want,), states = evaluate_states(lay.function, {k: v.clone() for k, v in tensors.items()}, precision="float64")
    y = m._run_scan(tensors, None)
    ((state_name, new_state),) = states.items()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tensors[state_name].double(), new_state, rtol=1e-5, atol=1e-5)


# ---- written the same way, under other names -------------------------------------------------
HEAD = "dims F, NS, KW\ndynamic B, S\n"
COMBINE = """
layer lin_rec(p: f32[B, F, NS], q: f32[B, F, NS], r: f32[B, F, NS], s: f32[B, F, NS]) -> (f32[B, F, NS], f32[B, F, NS]) {
    return r * p, s + q * r
}
"""
SCAN = COMBINE + """
layer my_scan(x: T[B, F, S], dlt: T[B, F, S], a: f32[F, NS], bb: T[B, NS, S], cc: T[B, NS, S],
              state carry: f32[B, F, NS]) -> T[B, F, S] {
    dA = exp(unsqueeze(A_OF, 1) * unsqueeze(DT, -1))
    dBu = unsqueeze(transpose(f32(bb)), 1) * unsqueeze(f32(x) * DT, -1)
    decay, hs = scan(lin_rec, dA, dBu, axis=2)
    hs = decay * unsqueeze(carry, 2) + hs
    carry = reshape(slice(hs, S - 1, S, axis=2), B, F, NS)
    return T(OUT)
}
"""
WRITTEN = {
    "plain": (SCAN.replace("A_OF", "a").replace("DT", "f32(dlt)")
              .replace("OUT", "sum(unsqueeze(transpose(f32(cc)), 1) * hs, axis=-1, keepdim=false)"),
              dict(gate=False, softplus=False, d_dtype=None, bias_dtype=None)),
    "softplus_gate": (SCAN.replace("A_OF", "a").replace("DT", "softplus(f32(dlt))")
                      .replace("OUT", "silu(f32(x)) * sum(hs * unsqueeze(transpose(f32(cc)), 1), axis=-1, "
                                      "keepdim=false)"),
                      dict(gate=True, softplus=True, d_dtype=None, bias_dtype=None)),
}


@pytest.mark.parametrize("which", list(WRITTEN))
def test_user_written_scan_lowers(which):
    text, flags = WRITTEN[which]
    prog = lf.loads(HEAD + text, "m.lf")
    p = match_scan(prog.specialise("my_scan", dtype="f16", F=16, NS=4))
    assert p.kind == "selective_scan" and (p.channels, p.state, p.dtype, p.a_dtype) == (16, 4, "f16", "f32")
    assert (p.gate, p.softplus, p.d_dtype, p.bias_dtype) == tuple(flags.values())
    assert p.name("u") == "x" and p.name("state") == "carry" and p.initial and p.final
    if which == "softplus_gate":   # z is u itself here: the gate's operand is whatever input it reads
        assert p.name("z") == "x"


def test_user_written_bare_state_update_lowers():
    """No Δ bias, no softplus, no skip, no gate; A in the input dtype; terms in another order."""
    prog = lf.loads(HEAD + """
layer step(v: T[B, F], d: T[B, F], a: T[F, NS], bv: T[B, NS], cv: T[B, NS], state s: f32[B, F, NS]) -> T[B, F] {
    s = unsqueeze(f32(bv), 1) * unsqueeze(f32(d) * f32(v), -1) + s * exp(f32(a) * unsqueeze(f32(d), -1))
    return T(sum(unsqueeze(f32(cv), 1) * s, axis=-1, keepdim=false))
}""", "m.lf")
    p = match_scan(prog.specialise("step", dtype="bf16", F=32, NS=16))
    assert p == ScanPattern(kind="state_update", channels=32, dtype="bf16", state=16, a_dtype="bf16",
                            operands=(("u", "v"), ("delta", "d"), ("A", "a"), ("B", "bv"), ("C", "cv"),
                                      ("state", "s")))
    assert p.plan("sm_90").key == "selective_state_update_d32_n16_bf16_abf16_sm90"


def test_user_written_conv_without_bias_or_silu_lowers():
    prog = lf.loads(HEAD + """
layer shift_conv(v: T[B, F, S], taps: f32[F, KW], state mem: T[B, F, KW - 1]) -> T[B, F, S] {
    out, mem = conv1d_causal(v, T(taps), axis=-1, state=mem)
    return out
}""", "m.lf")
    p = match_scan(prog.specialise("shift_conv", dtype="bf16", F=32, KW=3))
    assert p == ScanPattern(kind="conv", operands=(("x", "v"), ("weight", "taps"), ("state", "mem")), channels=32,
                            dtype="bf16", width=3, weight_dtype="f32", silu=False, initial=True, final=True)


# ---- what differs: positioned errors ---------------------------------------------------------
DIFFER = [
    ("selective_state_update", "return T((y + f32(x) * Dskip) * silu(f32(z)))",
     "return T((y + f32(x) * Dskip) * sigmoid(f32(z)))", "z gate differs"),
    ("selective_state_update", "return T((y + f32(x) * Dskip) * silu(f32(z)))",
     "return T((y + f32(x) * Dskip + f32(z)) * silu(f32(z)))", "one skip term"),
    ("selective_state_update", "h = exp(unsqueeze(d, -1) * A) * h",
     "h = exp(unsqueeze(d, -1) * -exp(A)) * h", "A an input"),
    ("mamba_conv", "return silu(y + unsqueeze(b, -1))", "return relu(y + unsqueeze(b, -1))",
     "under an optional silu"),
    ("softplus", "where(x > 20.0, x,", "where(x > 10.0, x,", "threshold is 10.0"),
]


@pytest.mark.parametrize("case", DIFFER, ids=[c[3] for c in DIFFER])
def test_a_layer_that_differs_is_a_positioned_lowering_error(case):
    from layerforge.dsl.program import stdlib_sources
    which, old, new, what = case
    (src,) = [s.text for s in stdlib_sources() if s.name.endswith("ssm.lf")]
    assert old in src
    text = "dims F\ndynamic B, S\n" + src.replace(old, new)
    prog = lf.loads(text, "variant.lf", with_stdlib=False)
    name = "selective_state_update" if which == "softplus" else which
    lay = prog.specialise(name, dtype="bf16", **(CONV if "conv" in name else SSM))
    line = next(i for i, s in enumerate(text.splitlines(), 1) if new.split("(")[0] in s and new in s) \
        if which != "softplus" else None
    with pytest.raises(LoweringError, match=what) as e:
        match_scan(lay)
    assert "variant.lf:" in str(e.value)
    if line is not None:
        assert f"variant.lf:{line}:" in str(e.value)
    reason = not_lowered_reason(lay)
    assert reason and what.split()[0] in reason
    with pytest.raises(LoweringError, match="none of them"):
        plans_for_layer(lay, "sm_90")
    assert "none of them" in LayerModule(lay).kernel_reason   # CUDA tensors run the reference evaluator
