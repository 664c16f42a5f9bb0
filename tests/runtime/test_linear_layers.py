"""Modules of product layers (the stdlib's linear.lf and layers written like them): weights
under torch.nn.Linear's names, the reference on CPU tensors, the small-token product's
argument mapping (checked through runtime/linear.gemv's torch path), unfused products on
the reference with the reason, and the CLI: check, list, show, build (which skips them)."""
from __future__ import annotations

import json

import pytest
import torch

import layerforge as lf
from layerforge.cli import main
from layerforge.codegen.linear_lower import match_linear
from layerforge.dsl.evaluator import LayerInputError
from layerforge.runtime.layers import LayerModule, module

from ..seeding import seeded_generator

DIMS = {"H": 64, "F": 40, "I": 64, "O": 48}
NAMES = ["linear_layer", "linear_bias", "linear_residual", "rms_norm_linear", "gemma_rms_norm_linear",
         "gate_up_swiglu", "rms_norm_gate_up_swiglu", "gemma_rms_norm_gate_up_geglu"]


def make(name, dtype="bf16", **scalars):
    prog = lf.stdlib()
    return module(name, dims=prog.bindings_for(name, DIMS), dtype=dtype, **scalars)


def randomise(mod, gen, n):
    """Fresh weights and forward inputs of `n` rows (as the layer's dtype)."""
    with torch.no_grad():
        for pname, t in mod.named_parameters():
            scale = 1.0 / t.shape[-1] ** 0.5 if t.dim() == 2 else 0.5
            t.copy_((torch.randn(t.shape, generator=gen) * scale + (1.0 if pname == "gamma" else 0.0)).to(t.dtype))
    params = {p.name: p for p in mod.function.params}
    return [torch.randn(n, int(params[name].shape[1]), generator=gen).to(params[name].dtype.torch)
            for name in mod.input_names]


def test_weights_take_torch_nn_linear_names():
    assert sorted(n for n, _ in make("linear_bias").named_parameters()) == ["bias", "weight"]
    m = make("rms_norm_gate_up_swiglu", eps=1e-5)
    assert sorted(n for n, _ in m.named_parameters()) == ["gamma", "weight"]
    assert m.weight.shape == (80, 64) and m.input_names == ["x"]
    assert make("linear_residual").input_names == ["x", "res"]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_product_layers_have_a_kernel(name):
    assert make(name).kernel_reason is None


@pytest.mark.parametrize("name", NAMES)
def test_cpu_calls_run_the_reference(name):
    mod = make(name, dtype="f32")
    args = randomise(mod, seeded_generator("linear-cpu", name), 5)
    tensors = {**dict(zip(mod.input_names, args)), **{p: getattr(mod, a) for p, a in mod._weights.items()}}
    (want,) = lf.evaluate(mod.function, {**tensors, **mod._scalars})
    torch.testing.assert_close(mod(*args), want)


@pytest.mark.parametrize("name", NAMES)
def test_product_path_maps_every_argument(name):
    """The CUDA path's call of runtime/linear.gemv (its torch fallback on CPU tensors: same
    arguments, the same prologue and epilogue) against the reference in float64."""
    mod = make(name, eps=1e-5) if "norm" in name else make(name)
    args = randomise(mod, seeded_generator("linear-map", name), 7)
    assert mod.kernel_reason is None
    tensors = {**dict(zip(mod.input_names, args)), **{p: getattr(mod, a) for p, a in mod._weights.items()}}
    y = mod._run_linear(tensors, dict(mod._scalars), None)
    (want,) = lf.evaluate(mod.function, {**tensors, **mod._scalars}, precision="float64")
    assert y.dtype == torch.bfloat16 and y.shape == want.shape
    err = (y.double() - want).norm() / want.norm()
    assert err < 1e-2, err


def test_product_path_checks_inputs_by_dsl_name():
    mod = make("linear_residual")
    x, r = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    with pytest.raises(lf.LayerInputError, match="'res'"):
        mod._run_linear({"x": x, "res": r, "w": mod.weight}, {}, None)


def test_unfused_products_run_the_reference_and_say_why():
    prog = lf.loads("layer scaled(x: T[N, I], w: T[O, I]) -> T[N, O] { return T(0.5 * f32(x @ w.T)) }\n", "s.lf",
                    with_stdlib=True)
    mod = LayerModule(prog.specialise("scaled", I=16, O=8, dtype="bf16"))
    assert "s.lf:1:60: a multiplication after the matrix product fuses only as a gated activation" in mod.kernel_reason
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(mod(x), (0.5 * (x.float() @ mod.weight.float().T)).to(torch.bfloat16))


# ---- the command line ---------------------------------------------------------------------
def test_cli_lists_and_checks_the_product_layers(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f" {name}(" in out
    assert main(["check"]) == 0


def test_cli_show_renders_the_product_kernel(capsys):
    assert main(["show", "rms_norm_gate_up_swiglu", "--dims", "H=4096,F=14336", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "gemv_n28672_k4096_m16_bf16_silu_rms_r1w8s3_sm90" in out and "__global__" in out


def test_cli_build_packs_product_layers_and_skips_what_does_not_fuse(tmp_path, capsys):
    """A product layer's two small-token kernels (up to 8 and up to 16 rows) go into the pack, each
    entry naming the layers it serves with their interface and fused pattern, compiled without
    spills; a layer with two products (lora) is skipped with the lowering's reason."""
    pytest.importorskip("layerforge.runtime.nvrtc")
    out_dir = tmp_path / "pack"
    assert main(["build", "--dims", "H=64,F=32,I=64,O=48,R=8", "--arch", "sm_80", "--layers",
                 "rms_norm,rms_norm_linear,lora", "-q", "-o", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "rms_norm_linear" not in text
    assert "skipped lora: lora: <stdlib>/rows.lf:" in text and "2 matrix products" in text
    manifest = json.loads((out_dir / "manifest.json").read_text())
    entries = {e["key"]: e for e in manifest["kernels"]}
    products = [e for e in manifest["kernels"] if e["family"] == "gemv"]
    assert "rms_norm_h64_bf16_sm80" in entries and sorted(e["max_m"] for e in products) == [8, 16]
    for e in products:
        assert e["n"] == 48 and e["k"] == 64 and e["norm"] == "rms" and e["spill_bytes"] == 0
        (rec,) = e["layers"]
        assert rec["layer"] == "rms_norm_linear" and rec["dims"] == {"H": 64, "O": 48}
        assert rec["linear"] == {"x": "x", "weight": "w", "n": 48, "k": 64, "dtype": "bf16", "bias": None,
                                 "residual": None, "gated": None, "norm_weight": "gamma", "norm_offset": 0.0,
                                 "eps": "eps", "wtype": None, "wscale": None, "group": 0, "wzero": None}
        assert [p["name"] for p in rec["interface"]["params"]] == ["x", "gamma", "w", "eps"]
    from layerforge.runtime.pack import load_pack
    pack = load_pack(out_dir, check_device=False)
    assert pack.layers == ["rms_norm", "rms_norm_linear"]
    qkv = pack.layer("rms_norm_linear", eps=1e-5)
    assert qkv._linear == match_linear(module("rms_norm_linear", dims={"H": 64, "O": 48}, dtype="bf16").layer)
    assert sorted(qkv._images) == [8, 16] and dict(qkv.named_parameters())["gamma"].shape == (64,)
    with pytest.raises(LayerInputError, match="CUDA tensors only"):
        qkv(torch.zeros(2, 64, dtype=torch.bfloat16))
