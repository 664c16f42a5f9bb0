"""dsl/numerics.py against transformers' own formulas, on the CPU: every RoPE type of
ROPE_INIT_FUNCTIONS (frequencies and attention factor) for realistic configs, BLOOM's ALiBi
slopes and T5's relative-position buckets."""
import math

import pytest
import torch

from layerforge.dsl import numerics
from layerforge.dsl.numerics import (RopeNotStatic, RopeParameterError, alibi_slopes, rope_attention_factor,
                                     rope_inv_freq, rope_scaling_from_hf, rope_scaling_from_json,
                                     rope_scaling_to_json, static_inv_freq, t5_bucket_table, t5_relative_bucket)

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# transformers computes the frequencies in float32: agreement to a few f32 ulps
F32_RTOL = 4e-7

PHI3_SHORT = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.01, 1.02, 1.02, 1.04,
              1.04, 1.07, 1.07, 1.1, 1.3, 1.3, 1.5, 1.57, 1.6, 1.65, 1.77, 1.87, 1.98, 1.99, 2.0, 2.0, 2.0, 2.0,
              2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
PHI3_LONG = [1.08, 1.11, 1.14, 1.34, 1.59, 1.6, 1.62, 2.62, 3.23, 3.24, 3.29, 3.5, 3.72, 5.18, 5.65, 6.74,
             7.35, 7.44, 10.57, 14.6, 21.88, 25.34, 27.6, 29.18, 32.07, 40.52, 41.08, 43.88, 48.04, 51.53,
             54.49, 55.34, 56.05, 60.55, 61.23, 61.58, 62.21, 63.27, 63.85, 64.32, 64.36, 64.45, 64.7, 64.9,
             64.98, 65.1, 65.26, 65.42]

# (name, config class, config kwargs, our head_dim, rotary dim)
CONFIGS = {
    "llama3.1-8b": (transformers.LlamaConfig, dict(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), 128),
    "qwen2-yarn": (transformers.Qwen2Config, dict(
        hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32768}), 128),
    "deepseek-yarn-mscale": (transformers.LlamaConfig, dict(
        hidden_size=2048, num_attention_heads=32, max_position_embeddings=163840,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096}), 64),
    "phi3-longrope": (transformers.Phi3Config, dict(
        hidden_size=3072, num_attention_heads=32, max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": PHI3_SHORT,
                         "long_factor": PHI3_LONG, "original_max_position_embeddings": 4096}), 96),
    "linear": (transformers.LlamaConfig, dict(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=16384,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}), 128),
    "dynamic": (transformers.LlamaConfig, dict(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=4096,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 128),
}


def hf(name):
    cls, kw, rd = CONFIGS[name]
    cfg = cls(**kw)
    return cfg, dict(cfg.rope_parameters), rd


def ours(name, **kw):
    cfg, params, rd = hf(name)
    scaling = rope_scaling_from_hf(params, cfg.max_position_embeddings, **kw)
    return scaling, float(params["rope_theta"]), rd


@pytest.mark.parametrize("name", ["llama3.1-8b", "qwen2-yarn", "deepseek-yarn-mscale", "linear"])
def test_static_rope_types_match_transformers(name):
    cfg, params, rd = hf(name)
    want, want_factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    scaling, theta, rd = ours(name)
    got = rope_inv_freq(theta, rd, scaling)
    assert got.dtype == torch.float64 and got.shape == (rd // 2,)
    torch.testing.assert_close(got, want.double(), rtol=F32_RTOL, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(want_factor, rel=1e-12)
    assert static_inv_freq(theta, rd, scaling) == tuple(got.tolist())


def test_yarn_attention_factor_is_the_papers_mscale():
    scaling, _, _ = ours("qwen2-yarn")
    assert rope_attention_factor(scaling) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    assert rope_attention_factor(ours("deepseek-yarn-mscale")[0]) == 1.0   # mscale == mscale_all_dim


@pytest.mark.parametrize("seq_len", [1, 4096, 4097, 131072])
def test_longrope_matches_transformers_in_both_regimes(seq_len):
    cfg, params, rd = hf("phi3-longrope")
    want, want_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=seq_len)
    scaling, theta, rd = ours("phi3-longrope")
    torch.testing.assert_close(rope_inv_freq(theta, rd, scaling, seq_len=seq_len), want.double(),
                               rtol=F32_RTOL, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(want_factor, rel=1e-12)
    assert want_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))


def test_longrope_has_one_table_only_with_its_regime_fixed():
    scaling, theta, rd = ours("phi3-longrope")
    with pytest.raises(RopeNotStatic, match="regime"):
        static_inv_freq(theta, rd, scaling)
    long_ = ours("phi3-longrope", longrope_regime="long")[0]
    cfg, _, _ = hf("phi3-longrope")
    want, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=5000)
    torch.testing.assert_close(torch.tensor(static_inv_freq(theta, rd, long_), dtype=torch.float64), want.double(), rtol=F32_RTOL, atol=0)


@pytest.mark.parametrize("seq_len", [None, 100, 4096, 8192, 20000])
def test_dynamic_ntk_matches_transformers_at_each_length(seq_len):
    cfg, params, rd = hf("dynamic")
    want, want_factor = ROPE_INIT_FUNCTIONS["dynamic"](cfg, "cpu", seq_len=seq_len)
    scaling, theta, rd = ours("dynamic")
    got = rope_inv_freq(theta, rd, scaling, seq_len=seq_len or cfg.max_position_embeddings)
    torch.testing.assert_close(got, want.double(), rtol=F32_RTOL, atol=0)
    assert rope_attention_factor(scaling) == want_factor == 1.0


def test_dynamic_ntk_has_no_constant_table():
    scaling, theta, rd = ours("dynamic")
    with pytest.raises(RopeNotStatic, match="dynamic"):
        static_inv_freq(theta, rd, scaling)


def test_default_frequencies_are_theta_to_the_minus_2i_over_d():
    got = rope_inv_freq(10000.0, 8)
    assert got.tolist() == [1.0, 10000.0 ** -0.25, 10000.0 ** -0.5, 10000.0 ** -0.75]


def test_unknown_rope_type_and_missing_keys_are_clear_errors():
    with pytest.raises(RopeParameterError, match="unknown rope type 'ntk-by-parts'"):
        rope_scaling_from_hf({"rope_type": "ntk-by-parts", "factor": 2.0})
    with pytest.raises(RopeParameterError, match="llama3 rope needs low_freq_factor, high_freq_factor"):
        rope_scaling_from_hf({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    with pytest.raises(RopeParameterError, match="factor must be a positive number"):
        rope_scaling_from_hf({"rope_type": "linear", "factor": 0.0})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_scalings_round_trip_through_json(name):
    scaling = ours(name)[0]
    assert rope_scaling_from_json(rope_scaling_to_json(scaling)) == scaling


def test_older_manifests_llama3_four_numbers_still_read():
    s = rope_scaling_from_json([8.0, 1.0, 4.0, 8192.0])
    assert s == ours("llama3.1-8b")[0]


@pytest.mark.parametrize("heads", [1, 2, 8, 12, 16, 24, 30, 32, 40, 64, 112])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    mask = torch.ones(1, 3)
    # build_alibi_tensor: slope(h) * position, position 1 at index 1; it raises the f32-rounded
    # base to integer powers in f32, so agreement is to a few f32 ulps
    want = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(heads), want.double(), rtol=1e-6, atol=0)


def test_alibi_slopes_are_powers_of_two():
    assert alibi_slopes(8, 8.0).tolist() == [2.0 ** -(i + 1) for i in range(8)]
    # 12 heads: the 8 of n = 8, then slopes 1, 3, 5, 7 of n = 16
    assert alibi_slopes(12, 8.0).tolist()[8:] == pytest.approx([2.0 ** (-0.5 * k) for k in (1, 3, 5, 7)], rel=1e-15)


def _t5_reference(rel, bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention
    return T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                 max_distance=max_distance)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 64), (16, 40)])
def test_t5_buckets_match_T5Attention(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-600, 601)
    want = _t5_reference(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(t5_relative_bucket(rel, num_buckets, max_distance, bidirectional), want)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_table_gives_every_distance_by_clamping(bidirectional):
    """What the kernels do: table[min(distance, max_distance)], plus half the buckets for later
    keys when bidirectional."""
    nb, md = 32, 128
    table = t5_bucket_table(nb, md, bidirectional)
    rel = torch.arange(-1000, 1001)
    dist = rel.abs() if bidirectional else (-rel).clamp(min=0)
    later = (rel > 0).long() * (nb // 2) if bidirectional else 0
    via_table = torch.tensor(table)[dist.clamp(max=md)] + later
    assert torch.equal(via_table, _t5_reference(rel, bidirectional, nb, md))


def test_one_module_holds_the_formulas():
    """The reference and the codegen take their numbers from dsl/numerics (no second copy)."""
    from layerforge.dsl import attention_ref, evaluator
    assert attention_ref.rope_cos_sin is numerics.rope_cos_sin
    assert evaluator.alibi_slopes is numerics.alibi_slopes
    assert evaluator.t5_relative_bucket is numerics.t5_relative_bucket


# ---- the rope(...) directive of attention blocks takes every static type ------------------

def _block(rope_args: str) -> str:
    return ("dims Hq, Hkv, D\ndynamic S, Skv\n"
            "attention a(q: T[S, Hq, D], k: T[Skv, Hkv, D], v: T[Skv, Hkv, D]) -> T[S, Hq, D] {\n"
            f"    rope({rope_args})\n"
            "    mask = q_pos >= kv_pos\n}\n")


def _rope_of(rope_args: str):
    from layerforge.dsl.program import Program
    layer = Program.from_source(_block(rope_args), "blk.lf").specialise("a", Hq=4, Hkv=2, D=64, dtype="bf16")
    return layer, layer.function.outputs[0].arg.rope


def test_yarn_directive_gives_transformers_frequencies_and_scales_the_kernels_rotation():
    from layerforge.codegen.attention import plan_paged_attention
    layer, rope = _rope_of("theta = 1000000.0, type = yarn, factor = 4.0, original_max_position = 32768")
    cls, kw, _ = CONFIGS["qwen2-yarn"]
    cfg = cls(**{**kw, "hidden_size": 64 * 28})
    want, factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    torch.testing.assert_close(rope_inv_freq(rope.theta, 64, rope.scaling), want.double(), rtol=F32_RTOL, atol=0)
    src = plan_paged_attention(layer, "sm_90").source()
    assert f"sn *= {factor!r}f;" in src and f"cs *= {factor!r}f;" in src


def test_longrope_directive_needs_its_regime():
    short = ", ".join(["1.0"] * 32)
    _, rope = _rope_of(f"type = longrope, short_factor = [{short}], long_factor = [{short}], "
                       "original_max_position = 4096, regime = long")
    assert rope.scaling.regime == "long"
    from layerforge.dsl.errors import DSLError
    with pytest.raises(DSLError, match=r"blk.lf:4:5: .*longrope rope frequencies depend on the sequence length"):
        _rope_of(f"type = longrope, short_factor = [{short}], long_factor = [{short}], original_max_position = 4096")


@pytest.mark.parametrize("args, message", [
    ("type = ntk, factor = 2.0", r"blk.lf:4:17: .*unknown rope type(.|\n)*known: default, linear, llama3, yarn, "
                                   r"longrope \(dynamic NTK"),
    ("type = yarn, factor = 4.0", r"blk.lf:4:5: .*yarn rope needs original_max_position"),
    ("type = linear, factor = 0.0", r"blk.lf:4:5: .*linear rope factor must be a positive number"),
])
def test_bad_rope_directives_point_at_the_source(args, message):
    from layerforge.dsl.errors import DSLError
    with pytest.raises(DSLError, match=message):
        _rope_of(args)


def test_dynamic_rope_is_a_lowering_error_for_constant_table_kernels():
    from layerforge.codegen.kv_append import plan_kv_append
    from layerforge.codegen.rope import RopeLoweringError
    from layerforge.dsl.ir import RopeSpec
    dynamic = rope_scaling_from_hf({"rope_type": "dynamic", "factor": 2.0}, 4096)
    with pytest.raises(RopeLoweringError, match="rope type 'dynamic'"):
        plan_kv_append("bf16", 8, 128, 16, RopeSpec(10000.0, "neox", 128, dynamic), "sm_90")
