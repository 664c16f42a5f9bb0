"""runtime/linear.py on the CPU: torch.nn.Linear's parameters and state dict, the torch path
of every epilogue against float64, GatedMLP against transformers' LlamaMLP, and input errors
raised before anything runs."""
import pytest
import torch
import torch.nn.functional as F

from layerforge.runtime.linear import Linear, LinearInputError, gemv


def test_state_dict_is_torch_linears():
    a = Linear(32, 48, bias=True)
    b = torch.nn.Linear(32, 48, bias=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 32)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("gated", [None, "silu", "gelu", "gelu_tanh"])
def test_torch_path_epilogues(gated):
    torch.manual_seed(0)
    lin = Linear(64, 96, bias=True, dtype=torch.float32)
    x = torch.randn(2, 3, 64)
    n_out = 48 if gated else 96
    r = torch.randn(2, 3, n_out)
    y = lin(x, gated=gated, residual=r)
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    if gated:
        g, u = ref.chunk(2, -1)
        act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[gated]
        ref = act(g) * u
    ref = ref + r.double()
    assert y.shape == (2, 3, n_out)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_input_errors():
    w = torch.randn(96, 64)
    with pytest.raises(LinearInputError, match="last dim 63"):
        gemv(torch.randn(2, 63), w)
    with pytest.raises(LinearInputError, match="gated must be"):
        gemv(torch.randn(2, 64), w, gated="relu")
    with pytest.raises(LinearInputError, match="even number"):
        gemv(torch.randn(2, 64), torch.randn(95, 64), gated="silu")
    with pytest.raises(LinearInputError, match="bias must be"):
        gemv(torch.randn(2, 64), w, torch.randn(95))
    with pytest.raises(LinearInputError, match="residual must be"):
        gemv(torch.randn(2, 64), w, residual=torch.randn(2, 95))
    with pytest.raises(LinearInputError, match="weight must be"):
        gemv(torch.randn(2, 64), torch.randn(96, 64, 1))


def test_gated_mlp_matches_transformers_llama_mlp():
    """GatedMLP.from_llama gives transformers' LlamaMLP (torch path on the CPU, float64 check),
    with the residual added; state-dict names gate_up.weight and down.weight."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    from layerforge.runtime.linear import GatedMLP
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, hidden_act="silu")
    torch.manual_seed(0)
    ref = LlamaMLP(cfg).double()
    mlp = GatedMLP.from_llama(ref)
    assert sorted(mlp.state_dict()) == ["down.weight", "gate_up.weight"]
    x, r = torch.randn(5, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    torch.testing.assert_close(mlp(x, r), ref(x) + r, rtol=1e-5, atol=1e-6)   # the activation in f32
    g = torch.rand(64, dtype=torch.float64) + 0.5
    xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    torch.testing.assert_close(mlp(x, norm=(g, 1e-5)), ref(xn), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        GatedMLP(8, 8, activation="relu")


def test_small_token_kernel_takes_a_row_strided_weight_without_a_copy(monkeypatch):
    """A weight that is a view of a wider buffer (rows apart by more than K, 16-byte aligned: the
    K-extended LoRA storage) goes to the small-token kernel as it is, its row stride as the
    plan's ldw; contiguous weights keep ldw 0 and odd views are still packed (copied)."""
    import layerforge.runtime.linear as linear
    calls = []

    def launcher(x, n, k, rows, gated, bias, residual, norm_offset, cache=None, wtype=None, group=0, ldw=0):
        def run(problem, args):
            calls.append((ldw, args[1]))
        return run
    monkeypatch.setattr(linear, "_kernel_ok", lambda x, w, rows: True)
    monkeypatch.setattr(linear, "_launcher", launcher)
    monkeypatch.setattr(linear, "STRIDED_W", True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    wide = torch.randn(40, 64 + 24, dtype=torch.bfloat16)
    for w, want in ((wide[:, :64], 88), (wide[:, :64].contiguous(), 0), (wide[:, 1:65], 0)):
        gemv(x, w)
        ldw, passed = calls[-1]
        assert ldw == want
        assert (passed.data_ptr() == w.data_ptr()) == (want != 0 or w.is_contiguous())
    with pytest.raises(ValueError, match="ldw = 60 must be 0 or a multiple of 8 of at least K"):
        from layerforge.codegen.gemv import plan_gemv
        plan_gemv("bf16", n=32, k=64, ldw=60)
