"""Tensor and pipeline parallelism on the CPU (gloo, forked processes): tiny random llama, qwen2
and gemma models (float32, the reference path) split over 2 ranks (and 2 x 2) give the
one-process model's logits (within 1e-5 of the largest) and the same greedy tokens on every rank;
gemma's one KV head is replicated on both ranks. The parallel layers against whole products, a
rank's pack, and the shard arithmetic and its errors without starting processes."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.models.families import canonical_state_dict, spec_from_config
from layerforge.models.loading import checkpoint_files, load_tensors
from layerforge.models.parallel import (check_parallel, rank_spec, shard_state_dict, stage_layers,
                                        stage_state_dict)
from layerforge.runtime.parallel import Layout, ParallelGroup, ShardError, init_parallel, kv_head_range, shard

from ..models.hf_tiny import make_tiny
from . import workers
from .ranks import run_ranks

pytest.importorskip("transformers")


def _built(tmp_path_factory, names) -> dict[str, str]:
    """name -> a tiny checkpoint folder with the one-process model's results (workers.make_case)."""
    out = {}
    for name in names:
        folder = tmp_path_factory.mktemp(name)
        make_tiny(name, folder)
        workers.make_case(folder)
        out[name] = str(folder)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _built(tmp_path_factory, ("llama", "qwen2", "gemma", "gpt_neox"))


def test_tensor_parallel_equals_one_process(cases):
    """TP = 2: qwen2 (2 KV heads, one a rank; q/k/v biases), gemma (one KV head on both ranks,
    tied and scaled embeddings); the parallel layers too, in the same world."""
    run_ranks(workers.check_layers_and_models, 2, [cases["qwen2"], cases["gemma"]], 2, 1)


def test_pipeline_parallel_equals_one_process(cases):
    """PP = 2 (one layer a stage), prefill in micro-batches of 4 tokens: the last stage's logits
    and every rank's greedy tokens are the one-process model's (gemma: the tied head's embedding
    on the last stage too)."""
    run_ranks(workers.check_models, 2, [cases["llama"], cases["gemma"]], 1, 2)


def test_granite_tensor_parallel_reads_its_scaled_slices(tmp_path_factory):
    """TP = 2 of Granite: each rank reads its slices of o and down from the files (models/loading.
    read_rank_state_dict) with the residual multiplier folded in, as the one-process model does."""
    run_ranks(workers.check_models, 2, list(_built(tmp_path_factory, ("granite",)).values()), 2, 1)


@pytest.fixture(scope="module")
def alibi_cases(tmp_path_factory):
    return _built(tmp_path_factory, ("bloom", "falcon_alibi"))


def test_alibi_tensor_parallel_equals_one_process(alibi_cases):
    """TP = 2 of BLOOM (ALiBi in the score, fused interleaved q/k/v) and Falcon-RW (ALiBi before the scaling): each
    rank's heads keep their slopes among all the model's heads (alibi_heads / alibi_first), so logits, a decode step
    and greedy tokens are the one-process model's."""
    run_ranks(workers.check_models, 2, list(alibi_cases.values()), 2, 1)


def test_alibi_rank_spec_names_its_heads():
    spec = _spec("bloom")
    local = rank_spec(spec, _layout(1))
    consts = dict(local.attention[0].consts)
    assert (consts["alibi_heads"], consts["alibi_first"]) == (spec.num_heads, spec.num_heads // 2)
    assert "alibi_first" not in dict(rank_spec(spec, Layout()).attention[0].consts)   # one rank: as it was


def test_tensor_and_pipeline_parallel_together(cases):
    """TP = 2 x PP = 2 on 4 ranks (ranks 0-1 the first stage, 2-3 the second): GPT-NeoX's (parallel
    residual: one sum of both branches; LayerNorms, biases on rank 0 only for the row-split
    products, partial RoPE) logits and greedy tokens are the one-process model's."""
    run_ranks(workers.check_models, 4, [cases["gpt_neox"]], 2, 2)


@pytest.fixture(scope="module")
def moe_cases(tmp_path_factory):
    """name -> a tiny MoE checkpoint folder with the one-process model's results: Mixtral (every
    layer sparse), Qwen2-MoE (a gated shared expert in slices, dense layers between), Qwen3-MoE."""
    return _built(tmp_path_factory, ("mixtral", "qwen2_moe", "qwen3_moe"))


def test_moe_tensor_and_pipeline_parallel_equal_one_process(moe_cases):
    """TP = 2 of mixtral, qwen2_moe and qwen3_moe (each rank every expert with half its features,
    the router replicated, one all-reduce per MLP): logits, a decode step and greedy tokens are the
    one-process model's; then PP = 2 of qwen2_moe (its sparse and dense layers over two stages) in
    the same world."""
    run_ranks(workers.check_moe_models, 2, list(moe_cases.values()), moe_cases["qwen2_moe"])


@pytest.fixture(scope="module")
def quant_cases(tmp_path_factory):
    """name -> a tiny quantised checkpoint folder (tests/models/test_quantized_pretrained) with the one-process
    model's results: Llama in AWQ's layout and Qwen2 (q/k/v biases) in GPTQ's (4-bit, group 32), Llama in
    compressed-tensors' FP8 (e4m3 weights, a scale a channel; activations quantised per token and 128 columns)."""
    from ..models.test_quantized_pretrained import fp8_checkpoint, quantised_checkpoint
    out = {}
    for name, method in (("llama", "awq"), ("qwen2", "gptq"), ("llama", "fp8")):
        folder = tmp_path_factory.mktemp(f"{name}_{method}")
        if method == "fp8":
            fp8_checkpoint(folder, "compressed-tensors", "channel")
        else:
            quantised_checkpoint(name, folder, method)
        workers.make_case(folder)
        out[f"{name}_{method}"] = str(folder)
    return out


def test_quantised_checkpoints_split_over_ranks(quant_cases):
    """AWQ, GPTQ and FP8 checkpoints, TP = 2: each rank makes the kernel's layout (u4, f8e4m3) of every projection
    and keeps its rows (q/k/v, gate/up) or whole groups of K (o, down): logits, a decode step and greedy tokens are
    the one-process quantised model's; then PP = 2 (each stage its layers' quantised projections whole)."""
    run_ranks(workers.check_models, 2, list(quant_cases.values()), 2, 1)
    run_ranks(workers.check_models, 2, list(quant_cases.values()), 1, 2)


# ---- without spawning -------------------------------------------------------------------------
def test_quantised_weights_split_by_rows_and_whole_groups():
    """runtime/quant.shard_quant: a rank's rows (several ranges, in order) or columns of W in the kernel's layout
    dequantise to that part of W (u4 in groups, i8 with row scales and in groups, FP8 per channel and in 128 x 128
    blocks); what cannot split is a ShardError-able ValueError naming why."""
    from layerforge.runtime.quant import (dequantize, gptq_to_kernel, pack_fp8, pack_i8, pack_u4, quantize_fp8,
                                          quantize_i8, quantize_u4, shard_quant)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g)
    rows = [range(0, 16), range(48, 56), range(80, 96)]
    cols = range(128, 256)
    u4 = pack_u4(*quantize_u4(w, 64), 64)
    i8r, i8g = pack_i8(*quantize_i8(w)), pack_i8(*quantize_i8(w, 32), 32)
    f8c = pack_fp8(*quantize_fp8(w))
    for qw in (u4, i8r, i8g, f8c):
        full = dequantize(qw)
        part = shard_quant(qw, 0, rows)
        assert (part.n, part.k) == (40, 256)
        assert torch.equal(dequantize(part), torch.cat([full[r.start:r.stop] for r in rows])), qw.wtype
        part = shard_quant(qw, 1, [cols])
        assert (part.n, part.k) == (96, 128) and part.qweight.is_contiguous()
        assert torch.equal(dequantize(part), full[:, cols.start:cols.stop]), qw.wtype
    wb = torch.randn(320, 384, generator=g)
    f8b = pack_fp8(*quantize_fp8(wb, 128), 128)
    full = dequantize(f8b)
    part = shard_quant(f8b, 0, [range(128, 320)])   # whole blocks, the last one partial
    assert torch.equal(dequantize(part), full[128:320])
    assert torch.equal(dequantize(shard_quant(f8b, 1, [range(256, 384)])), full[:, 256:384])
    with pytest.raises(ValueError, match="do not split at whole 128 x 128 scale blocks"):
        shard_quant(f8b, 0, [range(0, 160)])
    with pytest.raises(ValueError, match="do not split at whole groups of 64"):
        shard_quant(u4, 1, [range(32, 96)])
    with pytest.raises(ValueError, match="do not split at whole 16-byte pieces"):
        shard_quant(i8r, 1, [range(8, 40)])
    # GPTQ act-order: columns sorted by group, so a rank's K slice lies in every group (rows still split)
    q, z, sc = quantize_u4(w, 64)
    g_idx = (torch.randperm(256, generator=g) // 64).to(torch.int32)   # each group 64 columns, anywhere along K
    act = gptq_to_kernel(*_gptq_words(q, z, sc), g_idx, 64, torch.bfloat16)
    assert act.perm is not None and shard_quant(act, 0, rows).perm is act.perm
    with pytest.raises(ValueError, match="act-order"):
        shard_quant(act, 1, [cols])


def _gptq_words(q, z, s):
    """GPTQ's qweight [K / 8, N], qzeros [G, N / 8] (classic format: zeros stored minus 1), scales [G, N]."""
    from ..runtime.quant_formats import gptq_tensors
    qweight, qzeros, scales, _ = gptq_tensors(q.T.contiguous(), z.T.contiguous(), s.T.contiguous(), 64)
    return qweight, qzeros, scales


def test_quantised_moe_experts_are_not_split():
    from layerforge.models.families import QuantStack
    with pytest.raises(ShardError, match="quantised MoE layer's experts are not split"):
        shard_state_dict(_spec("mixtral"), {"layers.0.mlp.experts.gate_up_proj": QuantStack()}, 0, 2)


# ---- without spawning -------------------------------------------------------------------------
def _spec(name, **over):
    from ..models.hf_tiny import tiny_configs
    import transformers
    cls, kw = tiny_configs()[name]
    return spec_from_config(getattr(transformers, cls)(**{**kw, **over}).to_dict())


def test_shard_splits_parts_and_names_what_does_not_divide():
    t = torch.arange(12.0).view(12, 1)
    assert shard(t, 1, 2).flatten().tolist() == [6, 7, 8, 9, 10, 11]
    # gate rows then up rows: each rank keeps its slice of both, in the same order
    assert shard(t, 1, 2, parts=(6, 6)).flatten().tolist() == [3, 4, 5, 9, 10, 11]
    with pytest.raises(ShardError, match="weight: 12 does not split over 5 ranks"):
        shard(t, 0, 5)
    with pytest.raises(ShardError, match="part 1: 5 does not split over 2"):
        shard(torch.zeros(13, 1), 0, 2, parts=(8, 5))


def test_kv_heads_split_or_replicate():
    assert kv_head_range(8, 4, 1, 2) == (range(4, 8), range(2, 4))
    # fewer KV heads than ranks: each rank holds the KV head its q heads read
    assert [kv_head_range(8, 2, r, 4)[1] for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    assert kv_head_range(4, 1, 1, 2) == (range(2, 4), range(0, 1))
    with pytest.raises(ShardError, match="key/value heads: 3 neither split over 2"):
        kv_head_range(6, 3, 0, 2)
    with pytest.raises(ShardError, match="attention heads: 4 does not split over 3"):
        kv_head_range(4, 1, 0, 3)


def test_check_parallel_refuses_what_it_cannot_split():
    llama = _spec("llama")
    check_parallel(llama, 2, 2)
    with pytest.raises(ShardError, match="MLP intermediate size: 128 does not split over 3"):
        check_parallel(_spec("llama", num_attention_heads=6, num_key_value_heads=3, hidden_size=96,
                             intermediate_size=128), 3, 1)
    with pytest.raises(ShardError, match="vocabulary: 95 does not split over 2"):
        check_parallel(_spec("llama", vocab_size=95), 2, 1)
    with pytest.raises(ShardError, match="pp_size 3: the model has 2 layers"):
        check_parallel(llama, 1, 3)
    check_parallel(_spec("bloom"), 2, 1)   # ALiBi: each rank's block takes its heads' slopes (alibi_first)
    check_parallel(_spec("mixtral"), 1, 2)   # MoE layers go whole into their stage
    check_parallel(_spec("mixtral"), 2, 1)
    check_parallel(_spec("qwen2_moe"), 2, 1)
    # the experts' F / n is the down product's K in the expert kernels: a multiple of 8
    with pytest.raises(ShardError, match="MoE expert intermediate size 48 / 4 ranks = 12 per rank, not a multiple of 8"):
        check_parallel(_spec("qwen3_moe", moe_intermediate_size=48), 4, 1)
    with pytest.raises(ShardError, match="MoE expert intermediate size: 33 does not split over 2 ranks"):
        check_parallel(_spec("qwen3_moe", moe_intermediate_size=33), 2, 1)
    with pytest.raises(ShardError, match="MoE shared expert intermediate size 72 / 2 ranks = 36 per rank"):
        check_parallel(_spec("qwen2_moe", shared_expert_intermediate_size=72), 2, 1)
    with pytest.raises(ShardError, match="latent attention"):
        check_parallel(_spec("deepseek_v3"), 2, 1)


def test_stages_split_layers_contiguously():
    assert [stage_layers(5, 2, s) for s in range(2)] == [range(0, 3), range(3, 5)]
    assert [stage_layers(4, 4, s) for s in range(4)] == [range(i, i + 1) for i in range(4)]
    t = {"embed.weight": 0, "layers.0.a": 1, "layers.1.a": 2, "layers.2.a": 3, "final_norm.weight": 4,
         "lm_head.weight": 5}
    assert stage_state_dict(t, range(0, 2), first=True, last=False, tied=False) == {
        "embed.weight": 0, "layers.0.a": 1, "layers.1.a": 2}
    assert stage_state_dict(t, range(2, 3), first=False, last=True, tied=True) == {
        "embed.weight": 0, "layers.0.a": 3, "final_norm.weight": 4, "lm_head.weight": 5}


def _layout(rank, tp=2, pp=1):
    return Layout(tp=ParallelGroup(rank % tp, tp, None, tuple(range(tp))),
                  pp=ParallelGroup(rank // tp, pp, None, tuple(range(0, tp * pp, tp))), rank=rank, world=tp * pp)


def test_rank_shards_rebuild_the_full_products(tmp_path):
    """The ranks' q/k/v, o, gate/up and down shards of a real checkpoint: summed over the ranks,
    the row-split products of their column-split inputs give the full layer's; the spec of each
    rank has its heads and features and records the sharding."""
    make_tiny("llama", tmp_path)
    spec = spec_from_config(str(tmp_path / "config.json"))
    full = canonical_state_dict(spec, load_tensors(checkpoint_files(tmp_path)))
    x = torch.randn(3, spec.hidden_size)
    parts = [shard_state_dict(spec, full, r, 2) for r in range(2)]
    for r, p in enumerate(parts):
        local = rank_spec(spec, _layout(r))
        assert (local.num_heads, local.num_kv_heads, local.intermediate_size) == (2, 1, 64)
        assert local.extra["sharding"]["tp_rank"] == r and local.vocab_size == 96
        assert p["layers.0.attn.qkv.weight"].shape == ((2 + 2 * 1) * 16, 64)
        assert p["embed.weight"].shape == (48, 64)
    gate_up = [p["layers.1.mlp.gate_up.weight"] for p in parts]
    down = [p["layers.1.mlp.down.weight"] for p in parts]

    def mlp(gu, d):
        g, u = (x @ gu.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ d.T
    torch.testing.assert_close(sum(mlp(gu, d) for gu, d in zip(gate_up, down)),
                               mlp(full["layers.1.mlp.gate_up.weight"], full["layers.1.mlp.down.weight"]))
    # q rows: rank 0 heads 0-1, rank 1 heads 2-3; k/v rows: KV head r on rank r
    D, w = 16, full["layers.0.attn.qkv.weight"]
    q = torch.cat([p["layers.0.attn.qkv.weight"][:2 * D] for p in parts])
    k = torch.cat([p["layers.0.attn.qkv.weight"][2 * D:3 * D] for p in parts])
    torch.testing.assert_close(q, w[:4 * D])
    torch.testing.assert_close(k, w[4 * D:6 * D])
    o = [p["layers.0.attn.o.weight"] for p in parts]
    h = torch.randn(3, 4 * D)
    torch.testing.assert_close(h[:, :2 * D] @ o[0].T + h[:, 2 * D:] @ o[1].T, h @ full["layers.0.attn.o.weight"].T)


def test_from_pretrained_checks_the_split_before_starting_processes(tmp_path, monkeypatch):
    make_tiny("llama", tmp_path)
    with pytest.raises(ShardError, match="attention heads: 4 does not split over 3"):
        lf.from_pretrained(tmp_path, dtype=torch.float32, tp_size=3)
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ShardError, match="start the processes with torchrun"):
        init_parallel(2, 1)
    with pytest.raises(ShardError, match="tp_size must be a positive integer"):
        init_parallel(0, 1)


def test_benchmark_runs_on_two_cpu_ranks(tmp_path):
    """bench_parallel --cpu --tiny end to end (so that a GPU run does not discover a broken script)."""
    import json
    out = tmp_path / "r.json"
    run_ranks(workers.run_benchmark, 2, str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["n"]) for r in rows] == [("decode", 2), ("prefill", 8)]
    assert all(r["tp_s"] > 0 and r["no_reduce_s"] > 0 and r["tp1_s"] > 0 and r["ar_alone_s"] > 0 for r in rows)


def test_rank_pack_is_built_for_the_shard_and_records_it(tmp_path):
    """`layerforge build` of tensor-parallel rank 1 of 2: its attention kernels are specialised for
    its 2 q heads and 1 KV head, its activation for half the MLP features, and the manifest (as
    load_pack reads it) records the sharding."""
    from layerforge.models.parallel import build_rank_pack
    from layerforge.runtime.pack import load_pack
    cfg = dict(model_type="llama", vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
               rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False)
    build_rank_pack(cfg, tmp_path, tp_size=2, tp_rank=1, dtype="bf16", arch="sm_80")
    pack = load_pack(tmp_path, check_device=False)
    sh = pack.manifest["sharding"]
    assert (sh["tp_size"], sh["tp_rank"], sh["q_heads"], sh["kv_heads"]) == (2, 1, [2, 4], [1, 2])
    keys = [e["key"] for e in pack.manifest["kernels"]]
    assert "swiglu_f128_bf16_sm80" in keys
    attention = [k for k in keys if k.startswith("decoder_attn")]
    assert attention and all("hkv1_hq2" in k for k in attention), keys
    with pytest.raises(ShardError, match="tp_rank 2 is not a rank of tp_size 2"):
        build_rank_pack(cfg, tmp_path, tp_size=2, tp_rank=2, dtype="bf16", arch="sm_80")


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen2_moe_stacked"])
def test_moe_rank_shards_sum_to_the_full_layer(tmp_path, name):
    """qwen2_moe's MoE layer (routed experts and the gated shared expert: in slices, or a fused
    GatedMLP of 48 features) from each rank's shard and rank_spec's MoEConfig (F / 2 features, the
    same slices): the ranks' outputs sum to the one-process layer's (routing is the same: the
    router is whole on each rank)."""
    from layerforge.runtime.moe import MoE
    if name == "qwen2_moe_stacked":
        _qwen2_moe_stacked(tmp_path)
    else:
        make_tiny(name, tmp_path)
    spec = spec_from_config(str(tmp_path / "config.json"))
    full = canonical_state_dict(spec, load_tensors(checkpoint_files(tmp_path)))
    i = spec.moe_layers.index(True)
    pre = f"layers.{i}.mlp."

    def layer(cfg, tensors):
        m = MoE(cfg, dtype=torch.float32)
        m.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        return m
    x = torch.randn(5, spec.hidden_size)
    ref = layer(spec.moe, full)(x)
    parts = []
    for r in range(2):
        cfg = rank_spec(spec, _layout(r)).moe
        assert (cfg.inter, cfg.shared_inter, cfg.shared_slices) == (spec.moe.inter // 2, spec.moe.shared_inter // 2,
                                                                    spec.moe.shared_slices)
        parts.append(layer(cfg, shard_state_dict(spec, full, r, 2))(x))
    torch.testing.assert_close(parts[0] + parts[1], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(parts[0], ref, atol=1e-3)   # each rank's part alone is not the layer's


class _Counting:
    """safetensors' safe_open, counting the bytes of the tensors it hands out."""

    def __init__(self, real, count):
        self.real, self.count = real, count

    def __enter__(self):
        self.fh = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.fh.keys()

    def get_tensor(self, name):
        t = self.fh.get_tensor(name)
        self.count.append(t.numel() * t.element_size())
        return t

    def get_slice(self, name):
        sl, count = self.fh.get_slice(name), self.count

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def get_dtype(self):
                return sl.get_dtype()

            def __getitem__(self, idx):
                t = sl[idx]
                count.append(t.numel() * t.element_size())
                return t
        return Slice()


def _qwen2_moe_stacked(folder):
    """A 2-layer qwen2_moe checkpoint, both layers sparse, with a shared expert of 48 features (not a
    multiple of the experts' 32: a fused GatedMLP, not slices) and its experts' tensors stacked as
    transformers 5 holds them (experts.gate_up_proj [E, 2F, H], experts.down_proj [E, H, F])."""
    import re
    import shutil
    import transformers
    from safetensors.torch import save_file
    from ..models.hf_tiny import tiny_configs
    _, kw = tiny_configs()["qwen2_moe"]
    cfg = transformers.Qwen2MoeConfig(**{**kw, "num_hidden_layers": 2, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                         "shared_expert_intermediate_size": 48})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder / "hub")
    raw = load_tensors(checkpoint_files(folder / "hub"))
    out, experts = {}, {}
    for k, t in raw.items():
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", k)
        if m:
            experts.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            out[k] = t
    for base, ts in experts.items():
        E = 1 + max(j for j, _ in ts)
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([ts[(j, "gate")], ts[(j, "up")]]) for j in range(E)])
        out[f"{base}.down_proj"] = torch.stack([ts[(j, "down")] for j in range(E)])
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    shutil.copy(folder / "hub" / "config.json", folder / "config.json")


@pytest.mark.parametrize("name", ["llama", "gpt_neox", "qwen2_moe", "qwen2_moe_stacked"])
def test_rank_reads_give_the_whole_read_shards_and_read_less(tmp_path, monkeypatch, name):
    """read_rank_state_dict (what from_pretrained(tp_size, pp_size) reads on a rank) gives exactly
    shard_state_dict + stage_state_dict of the whole checkpoint: for TP ranks 0 and 1 of 2, and a
    TP 2 x PP 2 stage; dense llama (q/k/v and gate/up concatenations), GPT-NeoX (interleaved q/k/v:
    read whole, then split) and Qwen2-MoE (per-expert tensors stacked, the shared expert's slices,
    dense layers between; and with stacked experts and an unsliced shared expert). A TP rank reads
    its shard's bytes, well under the whole checkpoint's."""
    from layerforge.models import loading
    if name == "qwen2_moe_stacked":
        _qwen2_moe_stacked(tmp_path)
    else:
        make_tiny(name, tmp_path)
    spec = spec_from_config(str(tmp_path / "config.json"))
    files = checkpoint_files(tmp_path)
    full = canonical_state_dict(spec, load_tensors(files))
    if name == "qwen2_moe_stacked":
        assert "layers.0.mlp.shared_expert.gate_up.weight" in full and spec.moe.shared_slices == 0
    total = sum(t.numel() * t.element_size() for t in load_tensors(files).values())
    count: list[int] = []
    real_open = loading._safe_open
    monkeypatch.setattr(loading, "_safe_open", lambda f: _Counting(real_open(f), count))
    n = spec.num_layers
    for tp, layers, first, last in ((2, range(n), True, True), (2, range(n // 2, n), False, True)):
        for r in range(tp):
            count.clear()
            got = loading.read_rank_state_dict(files, spec, tp_rank=r, tp_size=tp, layers=layers, first=first,
                                               last=last)
            ref = stage_state_dict(shard_state_dict(spec, full, r, tp), layers, first=first, last=last,
                                   tied=spec.tie_word_embeddings)
            got = stage_state_dict(got, layers, first=first, last=last, tied=spec.tie_word_embeddings)
            assert got.keys() == ref.keys(), set(got) ^ set(ref)
            for k, t in ref.items():
                assert got[k].dtype == t.dtype and torch.equal(got[k], t), f"{name} rank {r}: {k}"
            # the bytes of its shard (no read for the zero biases of ranks past 0), and GPT-NeoX's
            # interleaved q/k/v whole
            whole_read = ("attn.qkv.weight", "attn.qkv.bias") if name == "gpt_neox" else ()
            expected = sum(full[k].numel() * full[k].element_size() if k.endswith(whole_read) else
                           0 if r and k.endswith(("attn.o.bias", "mlp.down.bias")) else t.numel() * t.element_size()
                           for k, t in ref.items())
            read = sum(count)
            assert read == expected, f"{name} rank {r}: read {read} bytes, its shard is {expected}"
            if name != "gpt_neox":
                assert read < (0.6 if len(layers) == n else 0.4) * total, f"{name} rank {r}: {read} of {total} bytes"
    count.clear()   # one process (tp 1): everything, once
    whole = loading.read_rank_state_dict(files, spec)
    assert sum(count) == total and whole.keys() == full.keys()
