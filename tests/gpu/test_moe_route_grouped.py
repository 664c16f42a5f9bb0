"""The grouped MoE routing kernel (codegen/route.py) through its module, against the reference
evaluator in float64 on fresh random inputs, outputs poisoned first (NaN weights, -1 ids)."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.plan import plan_layer
from layerforge.codegen.route import RoutePlan
from layerforge.runtime.layers import module

from ..devices import requires_gpu
from ..seeding import seeded_generator

pytestmark = [pytest.mark.gpu, requires_gpu]

TOKENS = [1, 7, 256, 4097]
CONFIGS = [dict(E=256, n_group=8, topk_group=4, k=8, routed_scaling_factor=2.5),     # DeepSeek-V3
           dict(E=64, n_group=1, topk_group=1, k=6, norm_topk_prob=False),           # V2-Lite style
           dict(E=160, n_group=8, topk_group=3, k=6, routed_scaling_factor=16.0)]    # V2 style
MARGIN = 1e-5   # decisions closer than this in float64 may go either way in f32


def route_module(cfg, dtype):
    mod = module("moe_route_grouped", dtype=dtype, device="cuda", **cfg)
    assert mod.kernel_reason is None and isinstance(plan_layer(mod.layer, "sm_90"), RoutePlan)
    return mod


def run(mod, logits):
    n, k = logits.shape[0], mod.layer.function.outputs[0].shape[-1]
    outs = (torch.full((n, int(k)), float("nan"), device="cuda"),
            torch.full((n, int(k)), -1, dtype=torch.int32, device="cuda"))
    got = mod(logits, out=outs)
    torch.cuda.synchronize()
    ref = lf.evaluate(mod.function, {"logits": logits, "bias": mod.bias, **mod._scalars}, precision="float64")
    return got, ref


def clear_rows(logits, bias, cfg):
    """Rows whose every decision (kept groups, chosen experts) has a float64 margin > MARGIN."""
    e, g, tg, k = cfg["E"], cfg["n_group"], cfg["topk_group"], cfg["k"]
    n = logits.shape[0]
    c = (torch.sigmoid(logits.double()) + bias.double()).view(n, g, e // g)
    gs = c.topk(2, dim=-1).values.sum(-1)
    ok = torch.ones(n, dtype=torch.bool, device=c.device)
    if tg < g:
        top = gs.sort(-1, descending=True).values
        ok &= (top[:, tg - 1] - top[:, tg]) > MARGIN
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(tg, dim=-1).indices, True)
    masked = c.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)
    best = masked.sort(-1, descending=True).values[:, :k + 1]
    ok &= ((best[:, :-1] - best[:, 1:]) > MARGIN).all(-1)
    return ok


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"e{c['E']}g{c['n_group']}k{c['k']}")
def test_kernel_matches_reference(cfg, dtype):
    mod = route_module(cfg, dtype)
    gen = seeded_generator("moe_route_grouped", cfg["E"], cfg["n_group"], dtype)
    with torch.no_grad():
        mod.bias.copy_(torch.rand(cfg["E"], generator=gen) * 0.2 - 0.1)
    for n in TOKENS:
        logits = torch.randn(n, cfg["E"], generator=gen).to(mod.layer.dtype.torch).cuda()
        (w, ids), (rw, rids) = run(mod, logits)
        assert not torch.isnan(w).any() and (ids >= 0).all()
        clear = clear_rows(logits, mod.bias, cfg)
        assert (~clear).sum() <= max(1, n // 100), "too many near-ties to check"
        assert torch.equal(ids[clear].long(), rids[clear].long())
        assert torch.allclose(w[clear].double(), rw[clear], rtol=1e-5, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: f"e{c['E']}g{c['n_group']}k{c['k']}")
def test_ties_go_to_the_lowest_index(cfg):
    """Logits of a few values and a bias of two: groups and experts tie exactly, in f32 as in
    float64; every id must be the reference's (lowest index first)."""
    mod = route_module(cfg, "f32")
    gen = seeded_generator("moe_route_grouped_ties", cfg["E"])
    with torch.no_grad():
        mod.bias.copy_(torch.randint(0, 2, (cfg["E"],), generator=gen).float() * 0.25)
    for n in TOKENS:
        logits = (torch.randint(-3, 4, (n, cfg["E"]), generator=gen).float() * 0.5).cuda()
        (w, ids), (rw, rids) = run(mod, logits)
        assert torch.equal(ids.long(), rids.long())
        assert torch.allclose(w.double(), rw, rtol=1e-5, atol=0)



# DeepSeek-V2's group-limited greedy routing (moe_route_limited: the kernel's softmax mode, no bias)
LIMITED = [dict(E=160, n_group=8, topk_group=3, k=6, routed_scaling_factor=16.0),   # DeepSeek-V2
           dict(E=64, n_group=1, topk_group=1, k=6, routed_scaling_factor=2.0),     # greedy, scaled
           dict(E=64, n_group=8, topk_group=2, k=6, norm_topk_prob=True)]


def limited_run(cfg, dtype, logits):
    mod = module("moe_route_limited", dtype=dtype, device="cuda", **cfg)
    assert mod.kernel_reason is None and plan_layer(mod.layer, "sm_90").softmax
    n, k = logits.shape[0], cfg["k"]
    outs = (torch.full((n, k), float("nan"), device="cuda"), torch.full((n, k), -1, dtype=torch.int32, device="cuda"))
    got = mod(logits, out=outs)
    torch.cuda.synchronize()
    return got, lf.evaluate(mod.function, {"logits": logits, **mod._scalars}, precision="float64")


def limited_clear_rows(logits, cfg):
    """Rows whose decisions are clear: the softmax is monotone, so the groups' ranks and the experts'
    are the logits' ranks; every gap that decides (the kept groups' last against the next, the chosen
    experts' against each other and the next) is either an exact tie (the same logit gives the same
    score in f32 as in float64: the lowest index wins in both) or wider than LOGIT_MARGIN. A margin on
    the scores themselves failed on clear rows: the low scores' absolute gaps are tiny."""
    e, g, tg, k = cfg["E"], cfg["n_group"], cfg["topk_group"], cfg["k"]
    n = logits.shape[0]
    lg = logits.double().view(n, g, e // g)
    gs = lg.max(-1).values

    def decided(d):
        return (d == 0) | (d > LOGIT_MARGIN)

    ok = torch.ones(n, dtype=torch.bool, device=lg.device)
    if tg < g:
        top = gs.sort(-1, descending=True).values
        ok &= decided(top[:, tg - 1] - top[:, tg])
    keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(tg, dim=-1).indices, True)
    best = lg.masked_fill(~keep.unsqueeze(-1), -float("inf")).view(n, e).sort(-1, descending=True).values[:, :k + 1]
    return ok & decided(best[:, :-1] - best[:, 1:]).all(-1)


LOGIT_MARGIN = 1e-4   # logits closer than this (and not equal) give scores whose f32 order may differ


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("cfg", LIMITED, ids=lambda c: f"e{c['E']}g{c['n_group']}k{c['k']}")
def test_limited_kernel_matches_reference(cfg, dtype):
    gen = seeded_generator("moe_route_limited", cfg["E"], cfg["n_group"], dtype)
    for n in TOKENS:
        logits = (torch.randn(n, cfg["E"], generator=gen) * 3).to(getattr(torch, {"bf16": "bfloat16",
                                                                                  "f32": "float32"}[dtype])).cuda()
        (w, ids), (rw, rids) = limited_run(cfg, dtype, logits)
        assert not torch.isnan(w).any() and (ids >= 0).all()
        clear = limited_clear_rows(logits, cfg)
        assert (~clear).sum() <= max(1, n // 50), "too many near-ties to check"
        assert torch.equal(ids[clear].long(), rids[clear].long())
        assert torch.allclose(w[clear].double(), rw[clear], rtol=1e-5, atol=0)


def test_limited_ties_go_to_the_lowest_index():
    """Logits of a few values: the softmax scores tie exactly (the same exp of the same difference), groups
    and experts alike; every id must be the reference's."""
    cfg = LIMITED[2]
    gen = seeded_generator("moe_route_limited_ties", cfg["E"])
    for n in TOKENS:
        logits = (torch.randint(-3, 4, (n, cfg["E"]), generator=gen).float() * 0.5).cuda()
        (w, ids), (rw, rids) = limited_run(cfg, "f32", logits)
        assert torch.equal(ids.long(), rids.long())
        assert torch.allclose(w.double(), rw, rtol=1e-5, atol=0)
