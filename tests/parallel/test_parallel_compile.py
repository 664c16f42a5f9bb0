"""A tensor-parallel rank's decode kernels are specialised for its shard and compile without
register spills (no GPU needed): for Llama-3-70B split over 2 ranks, rank_spec's sizes give the
fused small-token products of DecoderLayer.fused (q/k/v with the norm prologue, o, gated gate/up,
down; the residual add in the epilogues of rank 0 only) and the vocabulary-split LM head."""
import pytest

from layerforge.codegen.gemv import plan_gemv
from layerforge.models.families import spec_from_config
from layerforge.models.parallel import rank_spec
from layerforge.runtime.parallel import Layout, ParallelGroup

nvrtc = pytest.importorskip("layerforge.runtime.nvrtc")

LLAMA3_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                  num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                  max_position_embeddings=8192, rope_parameters=dict(rope_type="default", rope_theta=500000.0))


def test_rank_decode_products_compile_for_the_shard():
    """Rank 1's five products (no residual add), and rank 0's o product with it (its down
    product's differs from the one of rank 1 only by the same epilogue)."""
    spec = spec_from_config(LLAMA3_70B)
    local = rank_spec(spec, Layout(tp=ParallelGroup(1, 2, None, (0, 1)), rank=1, world=2))
    H, D, F = local.hidden_size, local.head_dim, local.intermediate_size
    assert (local.num_heads, local.num_kv_heads, F) == (32, 4, 14336)
    products = [dict(n=local.qkv_size, k=H, norm="rms"), dict(n=H, k=local.num_heads * D),
                dict(n=2 * F, k=H, gated="silu", norm="rms"), dict(n=H, k=F),
                dict(n=spec.vocab_size // 2, k=H, norm="rms"), dict(n=H, k=local.num_heads * D, residual=True)]
    assert [p["n"] for p in products] == [5120, 8192, 28672, 8192, 64128, 8192]
    for p in products:
        plan = plan_gemv("bf16", max_m=8, arch="sm_90", **p)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


# Qwen1.5-MoE-A2.7B's shapes: 60 experts of 1408 features, a gated shared expert of 5632 (4 slices)
QWEN2_MOE_A27B = dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                      moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                      num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, rms_norm_eps=1e-6, max_position_embeddings=8192,
                      rope_parameters=dict(rope_type="default", rope_theta=1000000.0))


def test_rank_expert_products_compile_for_the_shard():
    """A TP = 2 rank of a Qwen2-MoE model: its MoEConfig has half of each expert's features (704)
    and the shared expert still in 4 slices (of 704), and the two decode expert products of that
    shard (gate/up with x read through src and the gated activation, down; the shared slices a
    second stack in the same launch, the grid over the active experts) compile without spills."""
    spec = spec_from_config(QWEN2_MOE_A27B)
    local = rank_spec(spec, Layout(tp=ParallelGroup(0, 2, None, (0, 1)), rank=0, world=2))
    m = local.moe
    assert (m.inter, m.shared_inter, m.shared_slices, m.experts) == (704, 2816, 4, 60)
    assert local.extra["sharding"]["moe_inter"] == 1408
    E, S, H = m.experts + m.shared_slices, m.shared_slices, local.hidden_size
    for p in (dict(n=2 * m.inter, k=H, gated="silu", gather=True), dict(n=H, k=m.inter)):
        plan = plan_gemv("bf16", max_m=8, arch="sm_90", experts=E, fixed=S, compact=True, **p)
        res = nvrtc.compile_cuda(plan.source(), plan.kernel_name, nvrtc.CompileOptions("sm_90"))
        (kr,) = res.resources.values()
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)


@pytest.mark.parametrize("name", ["bloom_attn", "falcon_alibi_attn"])
def test_alibi_rank_attention_compiles_with_the_models_slopes(name):
    """A rank's ALiBi block (BLOOM-176B's 112 heads over 8 ranks: heads 42 .. 55) carries all the model's slopes
    and reads its heads' from its first: the Hopper prefill and the decode kernel compile without spills, and their
    table holds 112 slopes."""
    import layerforge as lf
    from layerforge.codegen.attention_tc import plan_tc_attention
    from layerforge.codegen.attention_wgmma import default_options, plan_wgmma_attention
    layer = lf.stdlib().specialise(name, Hq=14, Hkv=14, D=128, dtype="bf16", alibi_heads=112, alibi_first=42)
    for plan in (plan_wgmma_attention(layer, page_size=16, **default_options(layer)),
                 plan_tc_attention(layer, "sm_90", mode="decode")):
        src = plan.source()
        table = src[src.index("lf_alibi_slopes[] = {"):]
        assert table[:table.index("}")].count("f,") == 111 and "lf_alibi_slopes[min(max((int)(" in src
        res = nvrtc.compile_cuda(src, plan.kernel_name, nvrtc.CompileOptions(plan.arch))
        kr = res.resources[plan.kernel_name]
        assert kr.spill_stores == 0 and kr.spill_loads == 0, (plan.key, kr)
