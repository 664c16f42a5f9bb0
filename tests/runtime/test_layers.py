"""LayerModule on the CPU: weights under conventional names, Hugging Face state dicts, the
reference path, and clear errors for bad inputs before anything runs."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule, module


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def test_weights_are_parameters_under_conventional_names(prog):
    m = LayerModule(prog.specialise("layer_norm", H=32, dtype="f32"))
    assert sorted(n for n, _ in m.named_parameters()) == ["bias", "weight"]
    assert m.input_names == ["x"]
    assert m.weight.shape == (32,) and m.bias.shape == (32,)


def test_llama_rmsnorm_state_dict_loads_and_matches():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.normal_()
    m = module("rms_norm", H=48, dtype="f32", eps=1e-5)
    m.load_state_dict(hf.state_dict())
    x = torch.randn(5, 48)
    torch.testing.assert_close(m(x), hf(x), rtol=1e-5, atol=1e-6)


def test_two_outputs_and_scalar_override():
    m = module("add_rms_norm", H=16, dtype="f32")
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    y, s = m(x, r, eps=1e-2)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (16,), m.weight, 1e-2))


def test_wrong_shape_is_a_clear_error():
    m = module("rms_norm", H=16, dtype="f32")
    with pytest.raises(lf.LayerInputError, match=r"'x' must have shape \[N, 16\]; dim 1 is 8"):
        m(torch.randn(3, 8))


def test_wrong_rank_is_a_clear_error():
    m = module("rms_norm", H=16, dtype="f32")
    with pytest.raises(lf.LayerInputError, match=r"'x' must have shape \[N, 16\]"):
        m(torch.randn(16))


def test_wrong_dtype_is_a_clear_error():
    m = module("rms_norm", H=16, dtype="bf16")
    with pytest.raises(lf.LayerInputError, match=r"'x' must be bf16"):
        m(torch.randn(3, 16))


def test_wrong_device_is_a_clear_error():
    m = module("rms_norm", H=16, dtype="f32")
    with pytest.raises(lf.LayerInputError, match=r"'w' is on meta"):
        m.to("meta")(torch.randn(3, 16))


def test_inconsistent_dynamic_dim_is_a_clear_error():
    m = module("add_rms_norm", H=16, dtype="f32")
    with pytest.raises(lf.LayerInputError, match=r"N = 3"):
        m(torch.randn(3, 16), torch.randn(4, 16))


def test_unbound_dim_is_a_clear_error():
    with pytest.raises(lf.DSLError, match=r"dim 'H' is unbound"):
        module("rms_norm", dtype="f32")


def test_wrong_argument_count_and_unknown_scalar():
    m = module("rms_norm", H=16, dtype="f32")
    with pytest.raises(lf.LayerInputError, match="expected 1 tensor argument"):
        m(torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(lf.LayerInputError, match="unknown argument 'epsilon'"):
        m(torch.randn(3, 16), epsilon=1e-3)
    with pytest.raises(ValueError, match="'swiglu' has no dim or const parameter named 'eps'"):
        module("swiglu", F=8, dtype="f32", eps=1e-5)


def test_layers_without_a_kernel_family_run_torch_operations():
    """lora has two matrix products, which no kernel family lowers (the small-token product fuses
    one): the module says so and runs the reference's torch operations (cuBLAS on CUDA tensors),
    out= included."""
    mod = LayerModule(lf.stdlib().specialise("lora", I=64, O=32, R=8, dtype="f32"), scale=0.5)
    assert "2 matrix products" in mod.kernel_reason
    assert sorted(n for n, _ in mod.named_parameters()) == ["lora_a", "lora_b"]
    with torch.no_grad():
        mod.lora_a.normal_(), mod.lora_b.normal_()
    x = torch.randn(5, 64)
    want = 0.5 * (x @ mod.lora_a.T) @ mod.lora_b.T
    torch.testing.assert_close(mod(x), want, rtol=1e-5, atol=1e-5)
    out = torch.full((5, 32), float("nan"))
    assert mod(x, out=(out,)) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert LayerModule(lf.stdlib().specialise("rms_norm", H=64, dtype="f32")).kernel_reason is None


def test_dtype_may_be_a_torch_dtype():
    m = module("rms_norm", H=16, dtype=torch.bfloat16)
    assert m.weight.dtype == torch.bfloat16 and m.layer.dtype.value == "bf16"
    assert m(torch.randn(3, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype torch.complex64 has no DSL dtype"):
        module("rms_norm", H=16, dtype=torch.complex64)


@pytest.mark.parametrize("name,dims,inputs,outputs", [
    ("rms_norm", {"H": 16}, [(0, 16)], [(0, 16)]),
    ("add_rms_norm", {"H": 16}, [(0, 16), (0, 16)], [(0, 16), (0, 16)]),
    ("swiglu", {"F": 8}, [(0, 16)], [(0, 8)]),
])
def test_an_empty_batch_has_empty_outputs(name, dims, inputs, outputs):
    m = module(name, dtype="f32", **dims)
    got = m(*(torch.randn(s) for s in inputs))
    got = got if isinstance(got, tuple) else (got,)
    assert [tuple(o.shape) for o in got] == outputs and all(o.dtype == torch.float32 for o in got)
    out = tuple(torch.empty(s) for s in outputs)
    got = m(*(torch.randn(s) for s in inputs), out=out)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(out) and all(g is o for g, o in zip(got, out))


def test_an_empty_batch_binds_a_dynamic_dim_inside_an_expression_to_zero():
    prog = lf.Program.from_source("dims Z\ndynamic N\n"
                                  "layer halves(x: f32[2*N, Z]) -> f32[2*N, Z] {\n    return x * 0.5\n}\n")
    m = LayerModule(prog.specialise("halves", Z=4))
    assert m(torch.randn(0, 4)).shape == (0, 4)


def test_an_empty_batch_launches_no_kernel_on_the_cuda_path():
    """The CUDA path (driven here with a stand-in kernel, so that it runs without a GPU): the
    row count sizes the grid, and 0 rows launch nothing."""
    from layerforge.runtime.layers import _Launch
    m = module("rms_norm", H=16, dtype="f32")
    launched = []

    def launch_for(device, vec_bytes):
        m._lead = ["N"]
        return _Launch(lambda problem, argv: launched.append(problem), [])
    m._launch_for = launch_for
    y = m._run_cuda({"x": torch.randn(0, 16), "w": m.weight}, {"eps": 1e-6}, None)
    assert y.shape == (0, 16) and launched == []
    m._run_cuda({"x": torch.randn(3, 16), "w": m.weight}, {"eps": 1e-6}, None)
    assert launched == [(3,)]
