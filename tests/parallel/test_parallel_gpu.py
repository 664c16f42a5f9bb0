"""Tensor and pipeline parallelism on 2 GPUs (NCCL, spawned processes; NVLink multicast off):
tiny random llama and qwen2 models in float32 split TP = 2 or PP = 2 give the one-GPU model's
logits (prefill, and a decode step eager and replayed from a CUDA graph with the NCCL calls
captured) and its greedy tokens; a Llama-3-8B-shaped 4-layer model in bf16 gives them within
bf16 rounding (its decode steps on the fused small-token products, rank 0 adding the residual).
Skips, saying why, without 2 GPUs."""
from __future__ import annotations

import gc

import pytest
import torch

from ..models.hf_tiny import make_tiny
from . import workers
from .ranks import run_ranks

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip(f"needs 2 CUDA GPUs (this machine has {torch.cuda.device_count()})", allow_module_level=True)
pytest.importorskip("transformers")

TINY = ("llama", "qwen2")


def _case(folder, dtype):
    workers.make_case(folder, dtype=dtype, device="cuda:0")
    gc.collect()
    torch.cuda.empty_cache()   # the ranks need GPU 0's memory
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = {}
    for name in TINY:   # head_dim 64: the tensor-core attention kernels have a specialisation
        folder = tmp_path_factory.mktemp(name)
        make_tiny(name, folder, head_dim=64)
        out[name] = _case(folder, torch.float32)
    return out


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama_bf16")
    make_tiny("llama", folder, head_dim=64)
    return _case(folder, torch.bfloat16)


@pytest.fixture(scope="module")
def llama3_8b_shaped(tmp_path_factory):
    """Llama-3-8B's shapes (H 4096, 32 q / 8 KV heads, F 14336, V 128256, RoPE llama3) with 4 layers."""
    import transformers
    folder = tmp_path_factory.mktemp("llama3_8b_4l")
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return _case(folder, torch.bfloat16)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_float32_tiny_models_equal_one_gpu(tiny, tp, pp):
    run_ranks(workers.check_models, 2, [tiny[n] for n in TINY], tp, pp, "float32", "cuda", 1e-5, 4,
              backend="nccl", timeout=600)


def test_tp2_layers_equal_whole_products():
    run_ranks(workers.check_layers, 2, "cuda", backend="nccl", timeout=300)


def test_bf16_tensor_parallel_decode_fused_and_captured(tiny_bf16):
    """bf16 decode steps run the fused small-token products (rank 0 adds the residual stream in
    the o and down epilogues): eager and graph-replayed logits within bf16 rounding of one GPU's."""
    run_ranks(workers.check_models, 2, [tiny_bf16], 2, 1, "bfloat16", "cuda", 3e-2, 4, False,
              backend="nccl", timeout=600)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_llama3_8b_shaped_bf16_equals_one_gpu(llama3_8b_shaped, tp, pp):
    run_ranks(workers.check_models, 2, [llama3_8b_shaped], tp, pp, "bfloat16", "cuda", 3e-2, 512, False,
              backend="nccl", timeout=600)


@pytest.fixture(scope="module")
def tiny_moe_bf16(tmp_path_factory):
    """qwen2_moe (a gated shared expert in slices, dense layers between) and mixtral, head_dim 64
    (hidden 256: the experts' F 128 and 512, 64 and 256 a rank), bf16."""
    out = {}
    for name in ("qwen2_moe", "mixtral"):
        folder = tmp_path_factory.mktemp(f"{name}_bf16")
        make_tiny(name, folder, head_dim=64, dtype=torch.bfloat16)
        out[name] = _case(folder, torch.bfloat16)
    return out


def test_bf16_moe_tensor_parallel_equals_one_gpu(tiny_moe_bf16):
    """TP = 2 MoE layers on the expert kernels specialised for F / 2 (decode: the small-token
    expert products, the shared expert's slices in the same launches; prefill: the grouped GEMM
    or one product an expert), one all-reduce per MLP: logits (prefill, a decode step eager and
    graph-replayed) within bf16 rounding of one GPU's, greedy first tokens a near-greedy choice,
    every rank the same tokens; then qwen2_moe at PP = 2."""
    run_ranks(workers.check_moe_models, 2, [tiny_moe_bf16["qwen2_moe"], tiny_moe_bf16["mixtral"]],
              tiny_moe_bf16["qwen2_moe"], "bfloat16", "cuda", 3e-2, False, backend="nccl", timeout=600)
