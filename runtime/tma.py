"""TMA tensor maps for the generated kernels: 2-D tiled CUtensorMaps encoded on the host with
the driver's cuTensorMapEncodeTiled, passed to a kernel by value (ABI role "tmap").

    m = tensor_map(w, box=(128, 64))    # w [N, K] bf16/f16, row-major; box (rows, columns)
    launcher(problem, [m, ...])         # the driver copies its 128 bytes at launch

Every map here uses the layout the Hopper kernels read (templates/cuda/hopper.cuh.jinja: "TMA
into the swizzle layout"): a box of 64 16-bit columns (one 128-byte row) and the 128-byte
swizzle; elements of a box outside the tensor arrive as zeros (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
fills zeros; NAN_REQUEST_ZERO_FMA would fill NaN), so a kernel masks no M / N / K tail.

A map holds the tensor's address, sizes and row stride and nothing else, so maps are cached by
exactly those (`MapParams`): a new tensor at the same address with the same shape reuses the
same, still correct, map. Encoding is a host call of a few microseconds through cuda.bindings
(not measured here); a cache hit is a dict lookup. Under CUDA graph capture a map is copied
into the graph's kernel node like any argument, with the tensor's address in it: replays read
the tensors captured, as they do with pointer arguments.

cuTensorMapEncodeTiled needs the driver library (not a context, nor a GPU for the parameters):
`map_params` computes and checks everything passed to it, and is what the CPU tests check.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from cuda.bindings import driver as cu

from .driver import check

__all__ = ["MapParams", "map_params", "encode", "tensor_map", "BOX_COLUMNS"]

BOX_COLUMNS = 64            # 16-bit elements a box row: the 128-byte swizzle's row (8-bit: 128)
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float8_e4m3fn: "u8"}
_CU_DTYPES = {"bf16": "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16", "f16": "CU_TENSOR_MAP_DATA_TYPE_FLOAT16",
              "u8": "CU_TENSOR_MAP_DATA_TYPE_UINT8"}   # e4m3 bytes: TMA copies them as they are
_CACHE_LIMIT = 4096         # maps kept; past it the cache starts over (a map is 128 bytes)


@dataclass(frozen=True)
class MapParams:
    """Everything a 2-D tiled map is encoded from, in cuTensorMapEncodeTiled's order: dims and
    box innermost (columns) first, the row stride in bytes."""
    dtype: str                        # "bf16" | "f16"
    address: int                      # the tensor's first element, 16-byte aligned
    global_dim: tuple[int, int]       # (columns, rows)
    global_strides: tuple[int]        # (row stride in bytes,): a multiple of 16
    box_dim: tuple[int, int]          # (64, box rows)
    element_strides: tuple[int, int] = (1, 1)
    swizzle: str = "CU_TENSOR_MAP_SWIZZLE_128B"
    interleave: str = "CU_TENSOR_MAP_INTERLEAVE_NONE"
    l2_promotion: str = "CU_TENSOR_MAP_L2_PROMOTION_L2_256B"
    oob_fill: str = "CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE"   # zeros


_SWIZZLES = {128: "CU_TENSOR_MAP_SWIZZLE_128B", 64: "CU_TENSOR_MAP_SWIZZLE_64B", 32: "CU_TENSOR_MAP_SWIZZLE_32B"}


def map_params(t: torch.Tensor, box: tuple[int, int], swizzle: int = 128) -> MapParams:
    """The parameters of the map of a 2-D row-major tensor `t` [rows, cols] (bf16/f16, or e4m3,
    unit column stride) and a box of (rows, one swizzle row: 128 bytes by default, 64 16-bit or
    128 8-bit elements; 64 or 32 bytes for the narrower swizzles the Hopper attention's head
    dims take); ValueError where TMA cannot take them."""
    if swizzle not in _SWIZZLES:
        raise ValueError(f"the swizzle is 128, 64 or 32 bytes, got {swizzle}")
    if t.dim() != 2 or t.dtype not in _DTYPES:
        raise ValueError(f"a tensor map here is of a 2-D bf16/f16/e4m3 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    rows, cols = t.shape
    box_rows, box_cols = box
    row_bytes = t.stride(0) * t.element_size()
    if t.stride(1) != 1 or row_bytes % 16 or t.data_ptr() % 16:
        raise ValueError(f"TMA needs unit column stride, 16-byte aligned rows and base: strides {t.stride()}, "
                         f"address {t.data_ptr():#x}")
    want = swizzle // t.element_size()
    if box_cols != want or not 1 <= box_rows <= 256:
        raise ValueError(f"the box is (1..256 rows, {want} columns) for the {swizzle}-byte swizzle, got {box}")
    if not (1 <= rows < 1 << 32 and 1 <= cols < 1 << 32 and row_bytes < 1 << 40):
        raise ValueError(f"TMA takes 1 to 2^32 - 1 rows and columns, got {tuple(t.shape)}")
    return MapParams(dtype=_DTYPES[t.dtype], address=t.data_ptr(), global_dim=(cols, rows),
                     global_strides=(row_bytes,), box_dim=(box_cols, box_rows), swizzle=_SWIZZLES[swizzle])


def encode(p: MapParams) -> cu.CUtensorMap:
    """cuTensorMapEncodeTiled of `p` (the driver library needed; no context)."""
    u64, u32 = cu.cuuint64_t, cu.cuuint32_t
    return check(cu.cuTensorMapEncodeTiled(
        getattr(cu.CUtensorMapDataType, _CU_DTYPES[p.dtype]), len(p.global_dim), p.address,
        [u64(d) for d in p.global_dim], [u64(s) for s in p.global_strides], [u32(b) for b in p.box_dim],
        [u32(e) for e in p.element_strides], getattr(cu.CUtensorMapInterleave, p.interleave),
        getattr(cu.CUtensorMapSwizzle, p.swizzle), getattr(cu.CUtensorMapL2promotion, p.l2_promotion),
        getattr(cu.CUtensorMapFloatOOBfill, p.oob_fill)), "cuTensorMapEncodeTiled")


_maps: dict[MapParams, cu.CUtensorMap] = {}
_lock = threading.Lock()


def tensor_map(t: torch.Tensor, box: tuple[int, int], swizzle: int = 128) -> cu.CUtensorMap:
    """The map of `t` for boxes of `box` = (rows, 64) elements (16-bit; a narrower swizzle:
    swizzle / 2), cached by its parameters."""
    p = map_params(t, box, swizzle)
    m = _maps.get(p)
    if m is None:
        m = encode(p)
        with _lock:
            if len(_maps) >= _CACHE_LIMIT:
                _maps.clear()
            _maps[p] = m
    return m
