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
