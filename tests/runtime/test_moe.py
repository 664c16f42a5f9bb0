"""runtime/moe.py on the CPU: each MoE module against transformers' block (float32), built with
MoE.from_hf and loaded from the block's state dict, at several token counts, with tied experts;
the config readers and the input checks. (tests/gpu/test_moe_gpu.py holds the same on the GPU.)"""
import pytest
import torch

from layerforge.runtime.linear import LinearInputError
from layerforge.runtime.moe import MoE, MoEConfig, config_from_hf

from ..moe_blocks import H, block, run_block
from ..seeding import seeded_generator

pytest.importorskip("transformers")

NAMES = ["mixtral", "qwen2_moe", "qwen2_moe_mlp", "qwen3_moe", "deepseek_v3"]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("name", NAMES)
def test_moe_matches_transformers_f32(name, tokens, ties):
    blk, cfg = block(name, ties=ties)
    moe = MoE.from_hf(blk, cfg)
    x = torch.randn(tokens, H, generator=seeded_generator("moe_cpu", name, tokens, ties))
    ref = run_block(blk, x)
    with torch.no_grad():
        got = moe(x)
    assert got.shape == ref.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_moe_keeps_leading_dims_and_empty_batches():
    blk, cfg = block("mixtral")
    moe = MoE.from_hf(blk, cfg)
    x = torch.randn(2, 3, H, generator=seeded_generator("moe_lead"))
    with torch.no_grad():
        assert torch.allclose(moe(x), blk(x), atol=1e-5)
        assert moe(torch.empty(0, H)).shape == (0, H)


def test_config_from_hf_reads_each_family():
    from ..moe_blocks import configs
    c = configs()
    assert config_from_hf(c["mixtral"]) == MoEConfig(hidden=H, inter=256, experts=8, top_k=2)
    q2 = config_from_hf(c["qwen2_moe"])
    assert (q2.shared_inter, q2.shared_gate, q2.norm_topk_prob, q2.experts) == (128, True, False, 12)
    ds = config_from_hf(c["deepseek_v3"])
    assert (ds.router, ds.n_group, ds.topk_group, ds.routed_scaling_factor, ds.shared_inter) == ("grouped", 4, 2, 2.5, 64)
    with pytest.raises(ValueError, match="model_type 'llama'"):
        config_from_hf({"model_type": "llama", "hidden_size": 8})


@pytest.mark.parametrize("bad,match", [
    (dict(top_k=9), "top_k 9 > experts 8"),
    (dict(router="hash"), "router must be"),
    (dict(router="grouped", n_group=3), "8 experts in 3 groups"),
    (dict(activation="relu"), "activation must be one of"),
    (dict(shared_gate=True), "shared_gate without a shared expert"),
    (dict(hidden=0), "hidden must be a positive int"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**(dict(hidden=64, inter=32, experts=8, top_k=2) | bad))


def test_bad_inputs_are_caught_before_running():
    moe = MoE(MoEConfig(hidden=64, inter=32, experts=4, top_k=2), dtype=torch.float32)
    with pytest.raises(LinearInputError, match=r"x must be \[\.\.\., 64\]"):
        moe(torch.randn(3, 32))
    with pytest.raises(LinearInputError, match="x must be torch.float32"):
        moe(torch.randn(3, 64, dtype=torch.bfloat16))


@pytest.mark.parametrize("wtype,group,bound", [("u4", 128, 0.25), ("u4", 32, 0.2), ("i8", 0, 0.03), ("i8", 32, 0.03),
                                               ("f8e4m3", 0, 0.1), ("f8e4m3", 128, 0.1)])
def test_quantised_experts(wtype, group, bound):
    """quantize_ packs each expert in the small-token kernel's layout, stacked ([E, ...] buffers
    under the projections' names), and the block's output moves by no more than the format's
    rounding allows."""
    blk, cfg = block("mixtral", dtype=torch.bfloat16)
    moe = MoE.from_hf(blk, cfg)
    x = torch.randn(9, H, generator=seeded_generator("moe_q_cpu", wtype, group)).to(torch.bfloat16)
    with torch.no_grad():
        before = moe(x).float()
        moe.quantize_(wtype, group)
        after = moe(x).float()
    names = {k for k in moe.state_dict() if k.startswith("experts.")}
    assert names == {"experts.gate_up_proj_q", "experts.gate_up_proj_s", "experts.down_proj_q", "experts.down_proj_s"}
    assert moe.state_dict()["experts.gate_up_proj_q"].shape[0] == cfg.num_local_experts
    rel = ((after - before).abs().max() / before.abs().max()).item()
    assert 0 < rel <= bound, rel


def test_shared_expert_storage():
    """A shared expert of S x the routed size is kept as S slices ([S, 2F, H] gate/up, [S, H, F]
    down: slice j = gate and up rows jF .. (j+1)F - 1 and those columns of down), whose summed
    outputs are the whole expert's; another size keeps a fused GatedMLP."""
    from layerforge.runtime.moe import shared_slices
    sliced = MoE.from_hf(*block("qwen2_moe"))
    assert sliced.shared_slices == 2 and sliced.state_dict()["shared_expert.gate_up_proj"].shape == (2, 128, H)
    assert sliced.state_dict()["shared_expert.down_proj"].shape == (2, H, 64)
    mlp = MoE.from_hf(*block("qwen2_moe_mlp"))
    assert mlp.shared_slices == 0 and mlp.state_dict()["shared_expert.gate_up.weight"].shape == (320, H)
    gen = seeded_generator("shared_slices")
    g, u, d = torch.randn(192, 16, generator=gen), torch.randn(192, 16, generator=gen), torch.randn(16, 192, generator=gen)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    whole = (torch.nn.functional.silu(x @ g.double().T) * (x @ u.double().T)) @ d.double().T
    sl = shared_slices(g, u, d, 64)
    parts = sum((torch.nn.functional.silu(x @ gu[:64].double().T) * (x @ gu[64:].double().T)) @ dn.double().T
                for gu, dn in zip(sl["gate_up_proj"], sl["down_proj"]))
    torch.testing.assert_close(parts, whole)


def test_the_permutation_lists_the_experts_with_rows():
    """moe_align(active=True): the experts with pairs (the fixed ones included) in the first n
    entries, n last; the decode kernels' grid spans only them."""
    from layerforge.runtime.moe_kernels import moe_align, moe_active_reference
    ids = torch.tensor([[2, 0], [1, 2], [0, 1]], dtype=torch.int32)
    offsets, pos, src, active = moe_align(ids, 5, fixed=1, active=True)
    assert offsets.tolist() == [0, 2, 4, 6, 6, 6, 9]
    assert active.tolist() == [0, 1, 2, 5, -1, -1, 4]
    assert torch.equal(active, moe_active_reference(offsets))


def test_grouped_product_refuses_what_it_cannot_take():
    """runtime/moe.grouped_product (the generated grouped GEMM of the longer steps) needs CUDA
    tensors on sm_90; on the CPU it is a clear error before anything runs, and the MoE module's
    longer steps take torch's route there (the test above, at 33 tokens)."""
    from layerforge.runtime import moe as moe_mod
    xs, w = torch.zeros(16, 64, dtype=torch.bfloat16), torch.zeros(4, 32, 64, dtype=torch.bfloat16)
    with pytest.raises(LinearInputError, match="CUDA"):
        moe_mod.grouped_product(xs, w, torch.zeros(5, dtype=torch.int32))
    assert not moe_mod._grouped_kernel_serves(xs, w, w)
