"""dsl/stdlib/ssm.lf's Mamba layers as LayerModules on CUDA tensors run the scan kernels they lower
to (codegen/scan_lower.py through runtime/scan.py) and equal the DSL's own float64 evaluation
(dsl.evaluator.evaluate_states), output and new state, on fresh random inputs with the memory the
outputs will take poisoned with NaN first: the conv (lengths 1, 300, 1100), its decode step, the
selective scan (one chunk, a partial chunk, two chunks) and its state update, bf16 and f32; a
prefill followed by decode steps through the layers equals one longer prefill."""
import pytest
import torch

from layerforge.dsl.evaluator import evaluate_states
from layerforge.dsl.program import Program
from layerforge.runtime import scan as runtime_scan
from layerforge.runtime.layers import LayerModule

from ..devices import requires_gpu
from ..seeding import seeded_generator

pytestmark = [pytest.mark.gpu, requires_gpu]

TOL = {torch.bfloat16: 1e-2, torch.float32: 2e-5}
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}
F64 = torch.float64
F, NS, KW = 96, 16, 4


@pytest.fixture(scope="module")
def lib():
    return Program.stdlib()


def poison(*like) -> None:
    """Fill and free blocks of the outputs' sizes, so the caching allocator hands the kernels
    NaN-filled memory for their torch.empty outputs (and the module's state copies)."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in like]
    torch.cuda.synchronize()
    del blocks


def close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert not torch.isnan(got).any(), f"{what}: NaN in the kernel's output"
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.to(F64), want.to(F64), rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def make(lib, name: str, dtype: str, gen: torch.Generator):
    """A CUDA module of the layer with random weights (A < 0, as -exp(A_log)), and its weights by DSL name."""
    layer = lib.specialise(name, dtype=dtype, **({"F": F, "KW": KW} if "conv" in name else {"F": F, "NS": NS}))
    m = LayerModule(layer, device="cuda")
    assert m.kernel_reason is None, m.kernel_reason
    weights = {}
    for dsl_name, attr in m._weights.items():
        p = getattr(m, attr)
        v = torch.randn(p.shape, generator=gen) * 0.5
        if dsl_name == "A":
            v = -torch.exp(v)
        p.data.copy_(v.to(p.dtype))
        weights[dsl_name] = p.data
    return layer, m, weights


def inputs(layer, m, gen, batch: int, length: int) -> dict[str, torch.Tensor]:
    sizes = {"B": batch, "S": length}
    out = {}
    for p in layer.function.params:
        if p.name not in m.input_names:
            continue
        shape = [int(d.subs({s: sizes[s.name] for s in d.free_symbols})) if getattr(d, "free_symbols", None) else int(d)
                 for d in p.shape]
        scale = 0.5 if p.name in ("delta", "dt") else 1.0
        out[p.name] = (torch.randn(shape, generator=gen) * scale).to(p.dtype.torch).cuda()
    return out


KERNELS = {"conv": "conv", "conv_step": "conv_update", "selective_scan": "scan", "state_update": "state_update"}


def run_and_check(layer, m, weights, x: dict, dtype: torch.dtype, what: str) -> None:
    ref_in = {k: v.clone() for k, v in {**x, **weights}.items()}
    (want,), states = evaluate_states(layer.function, ref_in, precision="float64")
    (state_name,) = states
    state = x[state_name]
    poison((want.shape, want.dtype), (want.shape, want.dtype))
    y = m(*[x[n] for n in m.input_names])
    torch.cuda.synchronize()
    assert y.shape == want.shape and y.dtype == DTYPES[str(layer.dtype)]
    close(y, want, TOL[dtype], f"{what}: y")
    close(state, states[state_name], TOL[dtype] if state.dtype == torch.float32 else 0.0, f"{what}: state")
    kind = KERNELS[m._scan.kind]   # a scan kernel of the pattern's kind served it (runtime/scan.py's loaded ones)
    assert any(k[0] == kind and k[1] == F for k in runtime_scan._KERNELS), sorted(runtime_scan._KERNELS)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("length", [1, 300, 1100])
def test_conv_layer_matches_float64(lib, dtype, length):
    gen = seeded_generator("scan_lower_conv", dtype, length)
    layer, m, w = make(lib, "mamba_conv", dtype, gen)
    run_and_check(layer, m, w, inputs(layer, m, gen, 3, length), DTYPES[dtype], f"mamba_conv L={length}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_conv_step_layer_matches_float64(lib, dtype):
    gen = seeded_generator("scan_lower_conv_step", dtype)
    layer, m, w = make(lib, "mamba_conv_step", dtype, gen)
    x = inputs(layer, m, gen, 5, 1)
    for step in range(3):   # the state advances: each step checks against the state the last one left
        x["x"] = torch.randn(5, F, generator=gen).to(DTYPES[dtype]).cuda()
        run_and_check(layer, m, w, x, DTYPES[dtype], f"mamba_conv_step #{step}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("length", [1, 300, 1100])
def test_selective_scan_layer_matches_float64(lib, dtype, length):
    gen = seeded_generator("scan_lower_scan", dtype, length)
    layer, m, w = make(lib, "selective_scan", dtype, gen)
    run_and_check(layer, m, w, inputs(layer, m, gen, 2, length), DTYPES[dtype], f"selective_scan L={length}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_state_update_layer_matches_float64(lib, dtype):
    gen = seeded_generator("scan_lower_update", dtype)
    layer, m, w = make(lib, "selective_state_update", dtype, gen)
    x = inputs(layer, m, gen, 7, 1)
    for step in range(3):
        for k in ("x", "dt", "Bm", "Cm", "z"):
            x[k] = (torch.randn(x[k].shape, generator=gen) * (0.5 if k == "dt" else 1.0)).to(x[k].dtype).cuda()
        run_and_check(layer, m, w, x, DTYPES[dtype], f"selective_state_update #{step}")


def test_prefill_then_decode_steps_equal_a_longer_prefill(lib):
    """mamba_conv + selective_scan over 40 steps, then 4 steps of mamba_conv_step +
    selective_state_update, equal the prefill layers over all 44 steps (f32: the kernels' rounding only)."""
    gen = seeded_generator("scan_lower_prefill_decode")
    b, length, steps = 2, 40, 4
    _, conv, cw = make(lib, "mamba_conv", "f32", gen)
    step_layer = lib.specialise("mamba_conv_step", dtype="f32", F=F, KW=KW)
    conv_step = LayerModule(step_layer, device="cuda")
    conv_step.load_state_dict(conv.state_dict())
    _, scan, sw = make(lib, "selective_scan", "f32", gen)
    update = LayerModule(lib.specialise("selective_state_update", dtype="f32", F=F, NS=NS), device="cuda")
    update.load_state_dict(scan.state_dict())
    assert conv_step.kernel_reason is None and update.kernel_reason is None

    def seq(*shape):
        return torch.randn(*shape, generator=gen).cuda()
    x, delta, z = seq(b, F, length + steps), seq(b, F, length + steps) * 0.5, seq(b, F, length + steps)
    Bm, Cm = seq(b, NS, length + steps), seq(b, NS, length + steps)
    conv_all, h_all = torch.zeros(b, F, KW - 1, device="cuda"), torch.zeros(b, F, NS, device="cuda")
    u_all = conv(x, conv_all)
    y_all = scan(u_all, delta, Bm, Cm, z, h_all)

    conv_s, h = torch.zeros(b, F, KW - 1, device="cuda"), torch.zeros(b, F, NS, device="cuda")
    u = conv(x[..., :length].contiguous(), conv_s)
    y = scan(u, delta[..., :length].contiguous(), Bm[..., :length].contiguous(), Cm[..., :length].contiguous(),
             z[..., :length].contiguous(), h)
    ys = [y]
    for t in range(length, length + steps):
        ut = conv_step(x[..., t].contiguous(), conv_s)
        ys.append(update(ut, delta[..., t].contiguous(), Bm[..., t].contiguous(), Cm[..., t].contiguous(),
                         z[..., t].contiguous(), h)[..., None])
    close(torch.cat(ys, -1), y_all, 1e-4, "prefill + decode y")
    close(h, h_all, 1e-4, "prefill + decode ssm state")
    close(conv_s, conv_all, 0.0, "prefill + decode conv state")
