"""DeepSeek-V2's group-limited greedy MoE routing: the standard library's moe_route_limited against
transformers' DeepseekV2TopkRouter and an independent float64 formula (its tie rule: lowest index
first, groups and experts), and its kernel (codegen/route.py, the grouped routing kernel's softmax
mode) planned and compiled without spills (no GPU needed)."""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.plan import LoweringError, plan_layer
from layerforge.codegen.route import RoutePlan
from layerforge.runtime.layers import module

from ..seeding import seeded_generator
from .test_moe_route_grouped import lowest_index_topk


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def limited_route(logits, n_group, topk_group, k, norm, scale):
    """float64: softmax scores; a group scores its best; the best topk_group groups kept (the others'
    experts 0.0); top k by score; weights = the scores, renormalised when norm, times scale."""
    s = torch.softmax(logits.double(), -1)
    n, e = s.shape
    grouped = s.view(n, n_group, e // n_group)
    kept_groups = lowest_index_topk(grouped.max(-1).values, topk_group)
    keep = torch.zeros(n, n_group, dtype=torch.bool).scatter_(1, kept_groups, True)
    ids = lowest_index_topk(grouped.masked_fill(~keep.unsqueeze(-1), 0.0).view(n, e), k)
    w = s.gather(1, ids)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids


CONFIGS = [dict(E=160, n_group=8, topk_group=3, k=6),   # DeepSeek-V2
           dict(E=64, n_group=1, topk_group=1, k=6),    # greedy (V2-Lite's, with a scale)
           dict(E=64, n_group=8, topk_group=2, k=6)]


@pytest.mark.parametrize("norm,scale", [(False, 16.0), (True, 1.0)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"e{c['E']}g{c['n_group']}")
def test_reference_matches_float64_formula(prog, cfg, norm, scale):
    layer = prog.specialise("moe_route_limited", dtype="f32", norm_topk_prob=norm, routed_scaling_factor=scale, **cfg)
    logits = torch.randn(37, cfg["E"], generator=seeded_generator("moe_route_limited", cfg["E"], norm)) * 2
    w, ids = lf.evaluate(layer.function, {"logits": logits}, precision="float64")
    rw, rids = limited_route(logits, cfg["n_group"], cfg["topk_group"], cfg["k"], norm, scale)
    assert torch.equal(ids.long(), rids)
    assert torch.allclose(w, rw, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"e{c['E']}g{c['n_group']}")
def test_reference_matches_transformers_router(prog, cfg):
    """transformers' DeepseekV2TopkRouter (its f32 softmax; sorted=False, so compared as sets)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    hf = transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=cfg["E"], num_experts_per_tok=cfg["k"],
                                       n_group=cfg["n_group"], topk_group=cfg["topk_group"],
                                       topk_method="group_limited_greedy" if cfg["n_group"] > 1 else "greedy",
                                       routed_scaling_factor=16.0)
    router = DeepseekV2TopkRouter(hf)
    gen = seeded_generator("moe_route_limited_hf", cfg["E"])
    router.weight.data = torch.randn(cfg["E"], 32, generator=gen)
    logits, tw, ti = router(torch.randn(50, 32, generator=gen))
    layer = prog.specialise("moe_route_limited", dtype="f32", routed_scaling_factor=16.0, **cfg)
    w, ids = lf.evaluate(layer.function, {"logits": logits}, precision="float64")
    theirs, ours = ti.sort(-1), ids.long().sort(-1)
    assert torch.equal(theirs.values, ours.values)
    assert torch.allclose(tw.gather(1, theirs.indices).double(), w.gather(1, ours.indices), rtol=1e-6, atol=0)


def test_ties_go_to_the_lowest_index(prog):
    layer = prog.specialise("moe_route_limited", dtype="f32", E=64, n_group=8, topk_group=2, k=6)
    _, ids = lf.evaluate(layer.function, {"logits": torch.zeros(3, 64)})
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    logits = torch.zeros(1, 64)
    logits[0, 40] = 1.0   # group 5 wins with its one expert; group 0 second (ties, lowest index)
    _, ids = lf.evaluate(layer.function, {"logits": logits})
    assert ids.tolist() == [[40, 0, 1, 2, 3, 4]]


def test_the_stdlib_layer_plans_the_routing_kernel_without_a_bias(prog):
    plan = plan_layer(prog.specialise("moe_route_limited", dtype="bf16", E=160, n_group=8, topk_group=3, k=6),
                      "sm_90")
    assert isinstance(plan, RoutePlan) and plan.softmax
    assert [a.name for a in plan.abi.args] == ["p_logits", "o_0", "o_1", "n_rows"]
    src = plan.source()
    assert "expf(s[j] - mx)" in src and "score[g] = g1[g];" in src and ": 0.0f;" in src and "p_bias" not in src
    # groups of one expert are served (a group scores its best one), unlike moe_route_grouped's best two
    plan_layer(prog.specialise("moe_route_limited", dtype="f32", E=8, n_group=8, topk_group=2, k=2), "sm_90")
    with pytest.raises(LoweringError, match="k = 40"):
        plan_layer(prog.specialise("moe_route_limited", dtype="f32", E=64, n_group=8, topk_group=2, k=40), "sm_90")


def test_module_on_cpu_tensors_runs_the_reference():
    mod = module("moe_route_limited", dtype="f32", E=64, n_group=8, topk_group=2, k=4, routed_scaling_factor=2.0)
    assert mod.kernel_reason is None   # CUDA tensors run the kernel
    w, ids = mod(torch.zeros(2, 64))
    assert ids.tolist() == [[0, 1, 2, 3]] * 2 and torch.allclose(w, torch.full((2, 4), 2.0 / 64))


nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS + [dict(E=512, n_group=16, topk_group=4, k=32)],
                         ids=lambda c: f"e{c['E']}g{c['n_group']}k{c['k']}")
def test_kernel_compiles_without_spills(prog, cfg, dtype, arch):
    plan = plan_layer(prog.specialise("moe_route_limited", dtype=dtype, **cfg), arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, kr
