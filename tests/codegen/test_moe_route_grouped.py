"""Grouped top-k MoE routing (DeepSeek-V2/V3): the standard library's moe_route_grouped against
an independent float64 formula of the routing transformers' DeepseekV3 router describes, its
tie rule (lowest index first, groups and experts), and its kernel's compilation (no GPU needed).

The formula below drops a group's experts to -inf (DeepSeek's reference code); transformers
fills 0.0 instead, which chooses differently only where a kept s + bias is negative.
"""
import pytest
import torch

import layerforge as lf
from layerforge.codegen.plan import LoweringError, plan_layer
from layerforge.codegen.route import RoutePlan
from layerforge.runtime.layers import module

from ..seeding import seeded_generator


@pytest.fixture(scope="module")
def prog():
    return lf.stdlib()


def lowest_index_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last axis; equal values: the lower index first."""
    n = x.shape[-1]
    order = sorted(range(n), key=lambda i: (-x[..., i].item(), i)) if x.dim() == 1 else None
    if order is not None:
        return torch.tensor(order[:k])
    return torch.stack([lowest_index_topk(r, k) for r in x])


def grouped_route(logits, bias, n_group, topk_group, k, norm, scale):
    """float64: sigmoid scores; groups scored by their two best biased scores; the best
    topk_group groups kept; top k of their experts by biased score; weights = unbiased scores."""
    s = torch.sigmoid(logits.double())
    c = s + bias.double()
    n, e = c.shape
    grouped = c.view(n, n_group, e // n_group)
    group_score = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
    kept_groups = lowest_index_topk(group_score, topk_group)
    keep = torch.zeros(n, n_group, dtype=torch.bool).scatter_(1, kept_groups, True)
    masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)
    ids = lowest_index_topk(masked, k)
    w = s.gather(1, ids)
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids


CONFIGS = [dict(E=64, n_group=8, topk_group=3, k=6), dict(E=32, n_group=1, topk_group=1, k=4),
           dict(E=256, n_group=8, topk_group=4, k=8)]


@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"e{c['E']}g{c['n_group']}")
def test_reference_matches_float64_formula(prog, cfg, norm, scale):
    layer = prog.specialise("moe_route_grouped", dtype="f32", norm_topk_prob=norm, routed_scaling_factor=scale, **cfg)
    gen = seeded_generator("moe_route_grouped", cfg["E"], norm)
    logits = torch.randn(37, cfg["E"], generator=gen)
    bias = torch.rand(cfg["E"], generator=gen) * 0.2 - 0.1
    w, ids = lf.evaluate(layer.function, {"logits": logits, "bias": bias}, precision="float64")
    rw, rids = grouped_route(logits, bias, cfg["n_group"], cfg["topk_group"], cfg["k"], norm, scale)
    assert torch.equal(ids.long(), rids)
    assert torch.allclose(w, rw, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: f"e{c['E']}g{c['n_group']}")
def test_ties_go_to_the_lowest_index(prog, cfg):
    """Logits of three values only and a zero bias: groups and experts tie everywhere."""
    layer = prog.specialise("moe_route_grouped", dtype="f32", **cfg)
    gen = seeded_generator("moe_route_grouped_ties", cfg["E"])
    logits = torch.randint(-1, 2, (64, cfg["E"]), generator=gen).float()
    bias = torch.zeros(cfg["E"])
    w, ids = lf.evaluate(layer.function, {"logits": logits, "bias": bias}, precision="float64")
    rw, rids = grouped_route(logits, bias, cfg["n_group"], cfg["topk_group"], cfg["k"], True, 1.0)
    assert torch.equal(ids.long(), rids)
    assert torch.allclose(w, rw, rtol=1e-12, atol=0)


def test_all_equal_logits_choose_the_first_groups_first_experts(prog):
    layer = prog.specialise("moe_route_grouped", dtype="f32", E=64, n_group=8, topk_group=2, k=6)
    _, ids = lf.evaluate(layer.function, {"logits": torch.zeros(3, 64), "bias": torch.zeros(64)})
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    logits = torch.zeros(1, 64)
    logits[0, 8:16] = 1.0   # group 1 wins; group 0 second (ties with 2..7, lowest index)
    _, ids = lf.evaluate(layer.function, {"logits": logits, "bias": torch.zeros(64)})
    assert ids.tolist() == [[8, 9, 10, 11, 12, 13]]


def test_the_stdlib_layer_plans_its_own_kernel(prog):
    plan = plan_layer(prog.specialise("moe_route_grouped", dtype="bf16", E=256, n_group=8, topk_group=4, k=8),
                      "sm_90")
    assert isinstance(plan, RoutePlan)
    assert plan.key == "moe_route_grouped_e256_k8_n_group8_topk_group4_bf16_sm90"
    assert [a.name for a in plan.abi.args] == ["p_logits", "p_bias", "o_0", "o_1", "n_rows"]
    assert plan.describe()["rows"] == ["N"]


def test_unsupported_sizes_are_lowering_errors(prog):
    with pytest.raises(LoweringError, match="k = 40"):
        plan_layer(prog.specialise("moe_route_grouped", dtype="f32", E=64, n_group=8, topk_group=2, k=40), "sm_90")


COPY = """
dims E
dynamic N
layer my_route(logits: T[N, E], bias: f32[E]) -> (f32[N, 4], i32[N, 4]) {
    s = sigmoid(f32(logits))
    c = reshape(s + bias, N, 4, E // 4)
    best2, _ = topk(c, 2)
    _, groups = topk(reshape(sum(best2), N, 4), 2)
    kept = sum(f32(unsqueeze(iota(4), -1) == unsqueeze(groups, -2))) > 0.5
    _, idx = topk(reshape(where(kept, c, -1e30), N, E), 4)
    return gather(s, idx), idx
}
"""


def test_rows_of_different_shapes_are_reported_where_they_are(tmp_path):
    """A user's copy of the grouped routing is no stdlib layer: the row family says which
    reduction it cannot hold, with its file:line:col, the line and a caret."""
    path = tmp_path / "route.lf"
    path.write_text(COPY)
    layer = lf.load(str(path), with_stdlib=False).specialise("my_route", E=32, dtype="f32")
    with pytest.raises(LoweringError) as err:
        plan_layer(layer, "sm_90")
    msg = str(err.value)
    assert f"{path}:8:17: reductions over rows of different shapes" in msg
    assert "_, groups = topk(reshape(sum(best2), N, 4), 2)" in msg
    assert "\n" + " " * 20 + "^~~" in msg


def test_module_on_cpu_tensors_runs_the_reference():
    mod = module("moe_route_grouped", dtype="f32", E=64, n_group=8, topk_group=2, k=4, routed_scaling_factor=2.0)
    assert mod.kernel_reason is None   # CUDA tensors run the kernel
    w, ids = mod(torch.zeros(2, 64))
    assert ids.tolist() == [[0, 1, 2, 3]] * 2 and torch.allclose(w, torch.full((2, 4), 0.5))


nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["bf16", "f32"])
@pytest.mark.parametrize("cfg", [dict(E=256, n_group=8, topk_group=4, k=8), dict(E=64, n_group=1, topk_group=1, k=6),
                                 dict(E=160, n_group=8, topk_group=3, k=6), dict(E=512, n_group=16, topk_group=4, k=32)],
                         ids=lambda c: f"e{c['E']}g{c['n_group']}k{c['k']}")
def test_kernel_compiles_without_spills(prog, cfg, dtype, arch):
    plan = plan_layer(prog.specialise("moe_route_grouped", dtype=dtype, **cfg), arch)
    res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions(arch))
    assert res.cubin[:4] == b"\x7fELF"
    (kr,) = res.resources.values()
    assert kr.spill_stores == 0 and kr.spill_loads == 0 and kr.stack_frame == 0, kr
