"""Every generated row/pointwise kernel against the reference evaluator in float64, on fresh
random inputs with outputs poisoned first, across dtypes, token counts and widths."""
import pytest
import torch

import layerforge as lf
from layerforge.runtime.layers import LayerModule

from ..row_cases import ROW_LAYERS, bindings, make_inputs
from ..seeding import seeded_generator

TOKENS = [1, 7, 256, 4097]
WIDTHS = [8, 1536, 4096, 5120, 14336]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# relative tolerance per storage dtype; outputs round to the dtype, intermediates may too
RTOL = {"f32": 2e-5, "f16": 4e-3, "bf16": 2.5e-2}
# worst single element, relative to its magnitude (plus 1% of the largest): f32 allows for
# ill-conditioned rows (a group of two nearly equal values normalised by f32 statistics)
ELEM = {"f32": 1e-3, "f16": 3.2e-2, "bf16": 0.2}


def widths_for(name):
    if name == "rope":
        return [8, 64, 128, 256]
    if name.startswith("moe_route"):
        return [8, 64, 128]
    if name == "group_norm":   # 7: one group (row_cases.bindings)
        return [7] + WIDTHS
    return WIDTHS


CASES = [(n, w) for n in ROW_LAYERS for w in widths_for(n)]


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def poisoned(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(t)
    if out.is_floating_point():
        out.fill_(float("nan"))
    else:
        out.fill_(torch.iinfo(out.dtype).max)
    return out


def check_close(name, got, ref, dtype, rtol=None, atol=0.0):
    assert not torch.isnan(got).any(), f"{name}: NaN in output"
    assert torch.isfinite(got).all() or not torch.isfinite(ref).all()
    g, r = got.double(), ref.double()
    err = (g - r).norm() / r.norm().clamp_min(1e-30)
    rtol = rtol or RTOL[dtype]
    assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol}"
    elem = (((g - r).abs() - atol).clamp_min(0) / (r.abs() + 1e-2 * r.abs().max() + 1e-6)).max()
    assert elem <= ELEM[dtype], f"{name}: worst element error {elem:.3g}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name,width", CASES)
def test_kernel_matches_reference(prog, name, width, dtype):
    mod = LayerModule(prog.specialise(name, dtype=dtype, **bindings(name, width)), device="cuda")
    gen = seeded_generator(name, width, dtype)
    for n in TOKENS:
        args = make_inputs(mod, n, "cuda", gen)
        ref_inputs = dict(zip(mod.input_names, args))
        ref_inputs.update({k: getattr(mod, a) for k, a in mod._weights.items()})
        ref = lf.evaluate(mod.function, {**ref_inputs, **mod._scalars}, precision="float64")
        outs = tuple(poisoned(torch.empty(r.shape, dtype=o.dtype.torch, device="cuda"))
                     for r, o in zip(ref, mod.function.outputs))
        got = mod(*args, out=outs)
        got = got if isinstance(got, tuple) else (got,)
        torch.cuda.synchronize()
        if name.startswith("moe_route"):
            check_routing(name, got, ref, mod, args)
        else:
            # f32 RoPE angles pos * inv_freq round at large positions (as in every f32
            # implementation): ~1e-7 relative of up to 32768 rad
            # angles pos * inv_freq carry f32 rounding: up to max_pos * 2^-24 rad (HF does the same)
            rtol = 1e-3 if (name.startswith("rope") and dtype == "f32") else None
            atol = 4 * 32768 * 2.0**-24 * float(args[0].abs().max()) if name.startswith("rope") else 0.0
            for g, r in zip(got, ref):
                check_close(f"{name} n={n} w={width} {dtype}", g, r, dtype, rtol, atol)


def check_routing(name, got, ref, mod, args):
    """The chosen experts must be a valid top-k of the selection score (ties may order
    differently from torch.topk), their weights must match the reference's."""
    w, idx = got
    rw, ridx = ref
    e = int(mod.function.params[0].shape[-1])
    assert (idx >= 0).all() and (idx < e).all()
    assert (idx.sort(dim=-1).values.diff(dim=-1) != 0).all(), "duplicate experts"
    assert not torch.isnan(w).any()
    logits = args[0].double()
    score = logits if name == "moe_route" else torch.sigmoid(logits) + mod.bias.double()
    k = idx.shape[-1]
    chosen = score.gather(-1, idx.long())
    best = score.topk(k, dim=-1).values
    assert torch.allclose(chosen, best, rtol=1e-5, atol=1e-6), "not a top-k choice"
    assert (chosen.diff(dim=-1) <= 1e-6).all(), "not in descending order"
    # Rows whose chosen set equals the reference's must carry its weights (compared per expert).
    # A near-tie in the selection score (f32 here, float64 there) may pick another expert
    # of equal score; the check above already holds those rows to a valid top-k, and they
    # must stay rare.
    order, rorder = idx.long().sort(-1), ridx.long().sort(-1)
    same = (order.values == rorder.values).all(-1)
    assert (~same).sum() <= max(1, same.numel() // 1000), f"{int((~same).sum())} rows chose other experts"
    wg = w.double().gather(-1, order.indices)[same]
    wr = rw.double().gather(-1, rorder.indices)[same]
    assert torch.allclose(wg, wr, rtol=1e-3, atol=1e-5)


def test_unaligned_inputs_use_a_narrower_plan(prog):
    mod = LayerModule(prog.specialise("rms_norm", H=4096, dtype="bf16"), device="cuda", eps=1e-6)
    buf = torch.randn(3 * 4096 + 1, device="cuda").to(torch.bfloat16)
    x = buf[1:].view(3, 4096)  # 2-byte aligned only
    y = mod(x)
    ref = lf.evaluate(mod.function, {"x": x, "w": mod.weight, "eps": 1e-6}, precision="float64")[0]
    check_close("rms_norm unaligned", y, ref, "bf16")
    assert 2 in {k[1] for k in mod._launches}  # the 2-byte-aligned plan ran


def test_cuda_graph_capture_and_replay(prog):
    mod = LayerModule(prog.specialise("add_rms_norm", H=4096, dtype="bf16"), device="cuda", eps=1e-5)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    outs = (torch.empty_like(x), torch.empty_like(x))
    mod(x, r, out=outs)  # compile and load outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        mod(x, r, out=outs)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        r.copy_(torch.randn_like(r))
        outs[0].fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = lf.evaluate(mod.function, {"x": x, "res": r, "w": mod.weight, "eps": 1e-5}, precision="float64")
        check_close("graph y", outs[0], ref[0], "bf16")
        check_close("graph sum", outs[1], ref[1], "bf16")


def test_hf_state_dict_loads(prog):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    hf = LlamaRMSNorm(256, eps=1e-5).cuda().to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.normal_()
    mod = LayerModule(prog.specialise("rms_norm", H=256, dtype="bf16"), device="cuda", eps=1e-5)
    mod.load_state_dict(hf.state_dict())
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(mod(x), hf(x), rtol=1.6e-2, atol=1e-2)


def test_bad_inputs_fail_before_launch(prog):
    mod = LayerModule(prog.specialise("rms_norm", H=256, dtype="bf16"), device="cuda")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(lf.LayerInputError, match="shape"):
        mod(x[:, :128].contiguous())
    with pytest.raises(lf.LayerInputError, match="bf16"):
        mod(x.float())
    with pytest.raises(lf.LayerInputError, match="contiguous"):
        mod(torch.randn(256, 4, device="cuda", dtype=torch.bfloat16).t())
    with pytest.raises(lf.LayerInputError, match="cpu|device"):
        mod.cpu()(x)


MOE_TOKENS = TOKENS + [32768]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("e", [8, 64, 128])
@pytest.mark.parametrize("name", ["moe_route", "moe_route_sigmoid"])
def test_moe_routing_topk(prog, name, e, k, ties):
    """Both routing layers at E 8/64/128, top-2 and top-8, every token count; with `ties` the
    logits (and the sigmoid layer's bias) take a few values only, so many experts tie exactly:
    the chosen ones must then be the lowest-indexed (torch.topk's order as the tests define it)."""
    mod = LayerModule(prog.specialise(name, E=e, k=k, dtype="f32"), device="cuda")
    gen = seeded_generator(name, e, k, ties)
    for n in MOE_TOKENS:
        (x,) = make_inputs(mod, n, "cuda", gen)
        if ties:
            x = (torch.randint(-3, 4, (n, e), generator=gen).float() * 0.5).cuda()
            if name == "moe_route_sigmoid":
                with torch.no_grad():
                    mod.bias.copy_(torch.randint(0, 2, (e,), generator=gen).float() * 0.25)
        ins = {"logits": x, **({"bias": mod.bias} if name == "moe_route_sigmoid" else {})}
        ref = lf.evaluate(mod.function, {**ins, **mod._scalars}, precision="float64")
        outs = tuple(poisoned(torch.empty(r.shape, dtype=o.dtype.torch, device="cuda"))
                     for r, o in zip(ref, mod.function.outputs))
        got = mod(x, out=outs)
        torch.cuda.synchronize()
        check_routing(name, got, ref, mod, [x])
        if ties:
            _check_lowest_index_on_ties(name, got[1], x, mod)


def _check_lowest_index_on_ties(name, idx, x, mod):
    """Experts with identical inputs score identically: a chosen one must precede every
    unchosen twin, and twins among the chosen come in ascending index order."""
    feat = x.double()
    if name == "moe_route_sigmoid":
        feat = feat * 16 + mod.bias.double()  # logits are multiples of 0.5, bias of 0.25 in [0, 0.25]
    idx = idx.long()
    n, e = feat.shape
    k = idx.shape[-1]
    chosen_feat = feat.gather(-1, idx)                                   # [n, k]
    chosen = torch.zeros(n, e, dtype=torch.bool, device=x.device).scatter_(-1, idx, True)
    cols = torch.arange(e, device=x.device)
    for j in range(k):
        twin = (feat == chosen_feat[:, j:j + 1]) & ~chosen                # unchosen experts with equal input
        assert not (twin & (cols < idx[:, j:j + 1])).any(), "a tie went to a higher index"
    same = chosen_feat[:, 1:] == chosen_feat[:, :-1]
    assert (idx[:, 1:] > idx[:, :-1])[same].all(), "tied experts out of index order"


def test_lora_on_cuda_runs_torch_operations(prog):
    """No kernel family lowers matrix products yet: CUDA tensors go through the reference's
    torch operations (cuBLAS), with the same checks."""
    mod = LayerModule(prog.specialise("lora", I=1536, O=256, R=16, dtype="bf16"), device="cuda", scale=2.0)
    with torch.no_grad():
        mod.lora_a.normal_(0, 0.05), mod.lora_b.normal_(0, 0.05)
    x = torch.randn(33, 1536, device="cuda", dtype=torch.bfloat16)
    y = mod(x)
    want = (2.0 * (x.float() @ mod.lora_a.float().T) @ mod.lora_b.float().T).to(torch.bfloat16)
    assert y.device.type == "cuda" and not torch.isnan(y).any()
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(lf.LayerInputError):
        mod(x.float())
