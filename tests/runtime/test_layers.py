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


def test_per_token_fp8_layers_write_e4m3_rows_and_f32_scales():
    """The fused per-token FP8 layers (dsl/stdlib/quant.lf) are row kernels (kernel_reason None); on the
    CPU their outputs are float8_e4m3fn [N, H] and f32 [N], quantize_fp8_rows's bytes and scales of the
    f32 row value (runtime/quant.py, the per-token FP8 GEMM's activation quantisation)."""
    from layerforge.runtime.quant import quantize_fp8_rows
    m = module("rms_norm_fp8_per_token", H=64, dtype="bf16", eps=1e-5)
    assert m.kernel_reason is None and m.input_names == ["x"]
    with torch.no_grad():
        m.gamma.copy_(torch.randn(64) + 1)
    x = torch.randn(4, 64).to(torch.bfloat16)
    x[1] = 0
    q, s = m(x)
    xf = x.float()
    y = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + 1e-5) * m.gamma.float()
    rq, rs = quantize_fp8_rows(y, 64)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (4,)
    assert (q.view(torch.uint8) != rq.view(torch.uint8)).sum() <= 2 and torch.allclose(s, rs[:, 0], rtol=1e-6)
    assert s[1] == 0 and (q[1].float() == 0).all()
    e = module("swiglu_fp8_per_token", F=8, dtype="f16")(torch.randn(0, 16).half())
    assert [(tuple(t.shape), t.dtype) for t in e] == [((0, 8), torch.float8_e4m3fn), ((0,), torch.float32)]


def test_8bit_outputs_are_allocated_as_their_torch_dtypes_on_the_cuda_path():
    """The CUDA path (a stand-in kernel, no GPU): e4m3 / i8 outputs allocated as float8_e4m3fn / int8, a
    scale a row as f32 [N], passed in the kernel's argument order; a wrong out= dtype is an error."""
    from layerforge.codegen.plan import plan_layer
    from layerforge.runtime.layers import LayerInputError, _Launch
    m = module("swiglu_fp8_per_token", F=32, dtype="bf16")
    abi = plan_layer(m.layer, "sm_90").abi
    seen = []

    def launch_for(device, vec_bytes):
        m._lead = ["N"]
        return _Launch(lambda problem, argv: seen.append((problem, argv)), [(a.role, a.ref) for a in abi.args])
    m._launch_for = launch_for
    q, s = m._run_cuda({"gate_up": torch.randn(5, 64).to(torch.bfloat16)}, {}, None)
    assert (q.dtype, tuple(q.shape), s.dtype, tuple(s.shape)) == (torch.float8_e4m3fn, (5, 32), torch.float32, (5,))
    ((problem, argv),) = seen
    assert problem == (5,) and argv[1] is q and argv[2] is s
    with pytest.raises(LayerInputError, match=r"out\[0\] must be a contiguous torch.float8_e4m3fn tensor"):
        m._run_cuda({"gate_up": torch.randn(5, 64).to(torch.bfloat16)}, {},
                    (torch.empty(5, 32, dtype=torch.uint8), torch.empty(5)))
    prog = lf.loads("layer to_i8(x: T[N, H]) -> i8[N, H] { return i8(f32(x)) }\n")
    m8 = LayerModule(prog.specialise("to_i8", H=16, dtype="f32"))
    assert m8.kernel_reason is None
    abi8 = plan_layer(m8.layer, "sm_90").abi
    m8._launch_for = lambda device, vb: (setattr(m8, "_lead", ["N"]) or
                                         _Launch(lambda p, a: None, [(a.role, a.ref) for a in abi8.args]))
    assert m8._run_cuda({"x": torch.randn(3, 16)}, {}, None).dtype == torch.int8
    assert torch.equal(m8(torch.tensor([[0.5, 1.5, -2.5, 300.0] * 4])),
                       torch.tensor([[0, 2, -2, 127] * 4], dtype=torch.int8))


def test_8bit_inputs_are_checked_by_dtype():
    prog = lf.loads("layer deq(q: f8e4m3[N, H], s: f32[N]) -> f32[N, H] {\n"
                    "    return f32(q) * unsqueeze(s, -1)\n}\n"
                    "layer wid(q: i8[N, H]) -> f32[N, H] { return f32(q) }\n")
    m = LayerModule(prog.specialise("deq", H=8))
    assert m.kernel_reason is None
    with pytest.raises(lf.dsl.evaluator.LayerInputError,
                       match=r"deq: 'q' must be f8e4m3 \(torch.float8_e4m3fn\), got torch.uint8"):
        m(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2))
    q = torch.tensor([[1.0, -448.0, 0.001953125, 0.0] * 2]).to(torch.float8_e4m3fn)
    assert torch.equal(m(q, torch.full((1,), 2.0)), q.float() * 2)
    w = LayerModule(prog.specialise("wid", H=4))
    with pytest.raises(lf.dsl.evaluator.LayerInputError, match=r"wid: 'q' must be i8 \(torch.int8\), got torch.uint8"):
        w(torch.zeros(1, 4, dtype=torch.uint8))
    assert torch.equal(w(torch.tensor([[-128, 0, 5, 127]], dtype=torch.int8)), torch.tensor([[-128.0, 0, 5, 127]]))
