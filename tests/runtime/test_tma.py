"""Tensor maps (runtime/tma.py): the parameters passed to cuTensorMapEncodeTiled for the GEMM's
boxes, the layouts TMA refuses, and the cache (the encoding itself needs the driver library:
GPU machines only)."""
from types import SimpleNamespace

import pytest
import torch

from layerforge.runtime.tma import MapParams, map_params, tensor_map

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def test_x_and_w_maps_describe_rows_of_64_column_boxes_innermost_first():
    x = torch.empty(1000, 4096, dtype=torch.bfloat16)
    p = map_params(x, (128, 64))
    assert p == MapParams(dtype="bf16", address=x.data_ptr(), global_dim=(4096, 1000), global_strides=(8192,),
                          box_dim=(64, 128))
    assert p.swizzle == "CU_TENSOR_MAP_SWIZZLE_128B" and p.oob_fill == "CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE"
    assert p.element_strides == (1, 1) and p.interleave == "CU_TENSOR_MAP_INTERLEAVE_NONE"
    w = torch.empty(28672, 4096, dtype=torch.float16)
    assert map_params(w, (128, 64)).global_dim == (4096, 28672) and map_params(w, (128, 64)).dtype == "f16"


def test_e4m3_maps_take_boxes_of_128_one_byte_columns():
    """The FP8 GEMM's operands: e4m3 bytes copied as they are (UINT8), a box row one 128-byte swizzle row."""
    q = torch.empty(1000, 4096, dtype=torch.float8_e4m3fn)
    p = map_params(q, (128, 128))
    assert p.dtype == "u8" and p.global_dim == (4096, 1000) and p.global_strides == (4096,) and p.box_dim == (128, 128)
    with pytest.raises(ValueError, match="128 columns"):
        map_params(q, (128, 64))


def test_a_row_stride_wider_than_the_row_is_kept():
    base = torch.empty(64, 4096 + 64, dtype=torch.bfloat16)
    p = map_params(base[:, :4096], (128, 64))
    assert p.global_dim == (4096, 64) and p.global_strides == ((4096 + 64) * 2,)


@pytest.mark.parametrize("make, box, message", [
    (lambda: torch.empty(8, 64, dtype=torch.float32), (8, 64), "bf16/f16"),
    (lambda: torch.empty(8, 8, 64, dtype=torch.bfloat16), (8, 64), "2-D"),
    (lambda: torch.empty(64, 16, dtype=torch.bfloat16).t(), (8, 64), "unit column stride"),
    (lambda: torch.empty(8, 12, dtype=torch.bfloat16), (8, 64), "16-byte aligned"),       # 24-byte rows
    (lambda: torch.empty(8, 72, dtype=torch.bfloat16)[:, 1:65], (8, 64), "16-byte aligned"),
    (lambda: torch.empty(8, 64, dtype=torch.bfloat16), (8, 32), "64 columns"),
    (lambda: torch.empty(8, 64, dtype=torch.bfloat16), (257, 64), "1..256 rows"),
])
def test_layouts_tma_cannot_take_are_errors(make, box, message):
    with pytest.raises(ValueError, match=message):
        map_params(make(), box)


@pytest.mark.gpu
@needs_gpu
def test_encoded_maps_are_cached_by_their_parameters():
    x = torch.randn(300, 4096, dtype=torch.bfloat16, device="cuda")
    first = tensor_map(x, (128, 64))
    assert tensor_map(x, (128, 64)) is first
    assert tensor_map(x[:200], (128, 64)) is not first                 # fewer rows: another map
    assert len(first.opaque) == 16                                      # 128 opaque bytes
    # the map goes to the kernel by value (the driver copies its 128 bytes into the parameter
    # space, which the kernel declares 64-byte aligned): the host object's address is not used


def test_narrow_swizzles_take_boxes_of_their_rows():
    """The Hopper attention's caches at head dims of 32s / 16s (96, 80 ...): 64- and 32-byte swizzles,
    a box row of 32 / 16 16-bit columns; the pages x heads view of a cache."""
    cache = torch.empty(10, 16, 4, 96, dtype=torch.bfloat16)
    p = map_params(cache.view(-1, 4 * 96), (16, 32), 64)
    assert p.swizzle == "CU_TENSOR_MAP_SWIZZLE_64B" and p.box_dim == (32, 16) and p.global_dim == (384, 160)
    assert map_params(cache.view(-1, 4 * 96), (16, 16), 32).swizzle == "CU_TENSOR_MAP_SWIZZLE_32B"
    with pytest.raises(ValueError, match="32 columns\\) for the 64-byte swizzle"):
        map_params(cache.view(-1, 4 * 96), (16, 64), 64)
    with pytest.raises(ValueError, match="128, 64 or 32"):
        map_params(cache.view(-1, 4 * 96), (16, 8), 16)


def tma_decode(monkeypatch, tmp_path, d: int):
    """A llama block's (GQA 32 / 8, head dim d) PagedAttention over an e4m3 cache with LAYERFORGE_DECODE_TMA=1, and
    its decode plan; runtime/tma.tensor_map gives the maps' parameters, not the driver's encoding."""
    import layerforge as lf
    from layerforge.runtime import tma
    from layerforge.runtime.attention import PagedAttention
    from layerforge.runtime.cache import KernelCache
    monkeypatch.setenv("LAYERFORGE_DECODE_TMA", "1")
    monkeypatch.setattr(tma, "tensor_map", map_params)
    layer = lf.stdlib().specialise("llama_attn", dtype="bf16", Hq=32, Hkv=8, D=d)
    attn = PagedAttention(layer, arch="sm_90", kv_dtype="fp8_e4m3", cache=KernelCache(tmp_path))
    return attn, attn.tc_plan("decode")


def test_e4m3_decode_maps_are_one_head_row_of_bytes_a_box_row(monkeypatch, tmp_path):
    """LAYERFORGE_DECODE_TMA=1: the decode over an e4m3 cache takes maps of the caches as [pages x PAGE, HKV x D]
    byte tensors, boxes of min(PAGE, BN) keys x D bytes and the D-byte swizzle (128 at D128, 64 at D64): one
    head's row is one swizzle row, the layout the kernel's lf_st8 reads (runtime/attention._tensor_maps)."""
    for d, swizzle in ((128, "CU_TENSOR_MAP_SWIZZLE_128B"), (64, "CU_TENSOR_MAP_SWIZZLE_64B")):
        attn, plan = tma_decode(monkeypatch, tmp_path, d)
        assert plan.uses_tma
        cache = torch.empty(10, 16, 8, d, dtype=torch.float8_e4m3fn)
        maps = attn._tensor_maps(SimpleNamespace(abi=plan.abi), "decode", plan.config.keys, cache, cache)
        for p in maps.values():
            assert p.dtype == "u8" and p.box_dim == (d, 16) and p.global_dim == (8 * d, 160) and p.swizzle == swizzle


def test_e4m3_decode_launch_passes_the_maps_in_the_kernel_order(monkeypatch, tmp_path):
    """The runtime's decode launch (PagedAttention._launch_tc) with LAYERFORGE_DECODE_TMA=1 gives the kernel its maps
    last, as its ABI has them, the caches' other arguments as before (a recorder stands in for the kernel; the map
    parameters for the driver's encoding)."""
    from ..devices import record_tc_launches
    attn, plan = tma_decode(monkeypatch, tmp_path, 128)
    calls = record_tc_launches(monkeypatch, attn, plan)
    q = torch.zeros(4, 32, 128, dtype=torch.bfloat16)
    k8 = torch.zeros(40, 16, 8, 128, dtype=torch.float8_e4m3fn)
    v8 = torch.zeros_like(k8)
    attn._launch_tc(torch.device("cpu"), "decode", q, k8, v8, "page_table", "seq_lens", None, None, None, "out",
                    4, 10, 4, 1, 160, 1, {"k_scale": "ks", "v_scale": "vs"})
    ((_, _, args),) = calls
    assert [a.name for a in plan.abi.args][-2:] == ["k_map", "v_map"]
    for name, cache in (("k_map", k8), ("v_map", v8)):
        p = args[name]
        assert p.address == cache.data_ptr() and p.box_dim == (128, 16) and p.global_dim == (8 * 128, 40 * 16)
    assert args["k_cache"] is k8 and args["num_pages"] == 40 and args["num_splits"] == 1
