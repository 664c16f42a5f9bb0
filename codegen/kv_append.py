"""The paged-KV-cache append kernel: a frozen plan and its CUDA source.

    plan = plan_kv_append("bf16", num_kv_heads=8, head_dim=128, page_size=16,
                          rope=RopeSpec(10000.0, "neox", 128), arch="sm_90")
    plan.key       -> 'kv_append_hkv8_d128_p16_bf16_neox_theta10000_sm90'
    plan.source()  -> CUDA C (deterministic: same plan, same bytes)

The kernel writes T new tokens into a cache laid out as [num_pages, page_size, Hkv, D]:
token t goes to page `pages[t]`, slot `positions[t] % page_size`, with K rotated by RoPE at
`positions[t]` (V copied). With kv_dtype="fp8_e4m3" the cache holds e4m3 bits: each value, K
after its rotation, is divided by its KV head's float32 scale (k_scale / v_scale [Hkv]) and
rounded once to e4m3 (nearest even, saturating to +-448; cuda_fp8.h). Pages come from the
host (runtime/kv_cache.py checks them), so the kernel reads no page table. The same launch
also applies queued scalar updates to the device `seq_lens` and `page_table` (after the host
mirrors, see runtime/kv_cache.py).

Work is split into items of a few channels (16 bytes where the shapes allow), one per
thread: rotary K items (neox: a vector from each half of the rotary channels; gptj: a vector
of interleaved pairs), K channels past rotary_dim copied, and V copied as one row per token.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from typing import Any, ClassVar

from ..dsl.ir import RopeSpec
from ..dsl.numerics import RopeScaling, as_rope_scaling, rope_scaling_key, rope_scaling_to_json
from ..dsl.types import DType
from . import ops
from .abi import Arg, KernelABI
from .plan import KernelPlan
from .render import read_template, render
from .rope import rope_context, static_table

__all__ = ["KVAppendPlan", "plan_kv_append", "rope_fields", "check_rope", "BLOCK", "KV_DTYPES", "FP8_MAX"]

BLOCK = 256  # threads per block
KV_DTYPES = ("fp8_e4m3",)   # cache storage other than the model's dtype (None: the model's dtype)
FP8_MAX = 448.0             # the largest finite e4m3 value: quantised values saturate to +-FP8_MAX

_DTYPES = {  # name -> (C type, to float, from float, two-lane type, from two floats); rounding to nearest even
    "bf16": ("__nv_bfloat16", "__bfloat162float", "__float2bfloat16_rn", "__nv_bfloat162", "__floats2bfloat162_rn"),
    "f16": ("__half", "__half2float", "__float2half_rn", "__half2", "__floats2half2_rn"),
    "f32": ("float", "", "", "float2", "make_float2"),
}
_STYLES = ("neox", "gptj")


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n (n = 0 counts as divisible by anything)."""
    w = cap
    while w > 1 and n % w:
        w //= 2
    return w


@dataclass(frozen=True, kw_only=True)
class KVAppendPlan(KernelPlan):
    family: ClassVar[str] = "kv_append"
    dtype: str                    # "bf16" | "f16" | "f32": the cache's (and k's, v's) dtype
    num_kv_heads: int
    head_dim: int
    page_size: int
    rope_style: str | None = None  # "neox" | "gptj" | None (K copied unrotated)
    rope_theta: float | None = None
    rotary_dim: int | None = None  # <= head_dim; channels past it are copied
    rope_scaling: RopeScaling | None = None  # dsl/numerics (Llama 3's four numbers are accepted too)
    arch: str = "sm_90"
    vec_bytes: int = 16           # widest access; less for k/v that are not 16-byte aligned
    kv_dtype: str | None = None   # "fp8_e4m3": the cache stores e4m3 bits, scaled per KV head

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"kv append: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype is not None:
            if self.kv_dtype not in KV_DTYPES:
                raise ValueError(f"kv append: kv_dtype must be one of {KV_DTYPES} or None, got {self.kv_dtype!r}")
            if self.dtype == "f32" or self.head_dim % 16:
                raise ValueError(f"kv append: an fp8 cache takes bf16/f16 K/V of a head dim that is a multiple "
                                 f"of 16, got {self.dtype} and {self.head_dim}")
        for name in ("num_kv_heads", "head_dim", "page_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"kv append: {name} must be a positive int, got {v!r}")
        if self.vec_bytes not in (2, 4, 8, 16):
            raise ValueError(f"kv append: vec_bytes must be 2, 4, 8 or 16, got {self.vec_bytes!r}")
        if self.rope_style is None:
            if self.rope_theta is not None or self.rotary_dim is not None or self.rope_scaling is not None:
                raise ValueError("kv append: rope_theta/rotary_dim/rope_scaling given without a rope_style")
            return
        check_rope(self.rope_style, self.rope_theta, self.rotary_dim, self.head_dim)
        object.__setattr__(self, "rope_theta", float(self.rope_theta))  # 10000 and 10000.0: one plan
        object.__setattr__(self, "rope_scaling", as_rope_scaling(self.rope_scaling))
        static_table(self.rope_theta, self.rotary_dim, self.rope_scaling)  # a length-dependent type: an error

    # ---- names --------------------------------------------------------------------------
    @property
    def key(self) -> str:
        parts = ["kv_append", f"hkv{self.num_kv_heads}", f"d{self.head_dim}", f"p{self.page_size}", self.dtype]
        if self.kv_dtype is not None:
            parts.append("kv" + self.kv_dtype.replace("_", ""))
        if self.rope_style is None:
            parts.append("norope")
        else:
            parts.append(self.rope_style)
            if self.rotary_dim != self.head_dim:
                parts.append(f"rd{self.rotary_dim}")
            parts.append("theta" + f"{self.rope_theta:g}".replace(".", "p").replace("+", ""))
            if self.rope_scaling is not None:
                parts.append(rope_scaling_key(self.rope_scaling))
        if self.vec_bytes != 16:
            parts.append(f"v{self.vec_bytes}")
        parts.append(self.arch.replace("_", ""))
        return re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts))

    # ---- work split ---------------------------------------------------------------------
    @property
    def _rd(self) -> int:
        return self.rotary_dim if self.rope_style is not None else 0

    @property
    def _max_load(self) -> int:
        """Elements per load: within vec_bytes and dividing D, so every head starts aligned."""
        return _pow2_divisor(self.head_dim, self.vec_bytes // DType[self.dtype].itemsize)

    def layout(self) -> dict[str, int]:
        """Channels per item (W_*) and per load (VE_*) of each item kind, and item counts."""
        return dict(_layout(self))

    @property
    def kernels(self) -> tuple[KernelABI, ...]:
        return (_abi(self),)

    def describe(self) -> dict[str, Any]:
        kv = {"kv_dtype": self.kv_dtype} if self.kv_dtype else {}
        return {"dtype": self.dtype, **kv, "page_size": self.page_size, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "vec_bytes": self.vec_bytes,
                "rope": None if self.rope_style is None else {
                    "style": self.rope_style, "theta": self.rope_theta, "rotary_dim": self.rotary_dim,
                    "scaling": rope_scaling_to_json(self.rope_scaling)}}

    # ---- source -------------------------------------------------------------------------
    def source(self) -> str:
        return _source(self)


@functools.lru_cache(maxsize=256)
def _layout(plan: KVAppendPlan) -> dict[str, int]:
    D, rd, H = plan.head_dim, plan._rd, plan.num_kv_heads
    if plan.rope_style == "neox":
        w_rot = _pow2_divisor(rd // 2, 8)   # a vector from each half: offsets c and c + rd/2
    elif plan.rope_style == "gptj":
        w_rot = _pow2_divisor(rd, 8)        # >= 2 (rd is even): whole pairs
    else:
        w_rot = 1
    w_pass = _pow2_divisor(D - rd, 8)
    w_v = _pow2_divisor(H * D, 8)
    n_rot = 0 if not rd else (rd // 2 if plan.rope_style == "neox" else rd) // w_rot
    n_pass = (D - rd) // w_pass
    # A load divides its item and every offset the item starts at (h*D, rd, rd/2, slot*H*D).
    ve = plan._max_load
    return {
        "w_rot": w_rot, "ve_rot": _pow2_divisor(w_rot, ve),
        "w_pass": w_pass, "ve_pass": _pow2_divisor(math.gcd(w_pass, rd or w_pass), ve),
        "w_v": w_v, "ve_v": _pow2_divisor(w_v, ve),
        "n_rot": n_rot, "n_pass": n_pass, "n_v": H * D // w_v,
        "items_per_token": H * (n_rot + n_pass) + H * D // w_v,
    }


@functools.lru_cache(maxsize=256)
def _abi(plan: KVAppendPlan) -> KernelABI:
    """One thread per item of a token (rotary K, K copied, V) or per queued bookkeeping write."""
    c = ops.STORAGE_TYPE[DType[plan.dtype]]
    kc = "unsigned char" if plan.kv_dtype else c   # e4m3 bits (cuda_fp8.h's __nv_fp8_storage_t)
    args = (Arg("k_cache", f"{kc}* __restrict__", "output"), Arg("v_cache", f"{kc}* __restrict__", "output"),
            Arg("k", f"const {c}* __restrict__", "input"), Arg("v", f"const {c}* __restrict__", "input"),
            Arg("k_stride", "long long", "dim"), Arg("v_stride", "long long", "dim"),   # token rows, elements
            # page[T], position[T], then (seq, len)[U] and (index, page)[W] as columns
            Arg("meta", "const int* __restrict__", "input"),
            Arg("num_tokens", "int", "dim"), Arg("num_len_updates", "int", "dim"), Arg("num_page_updates", "int", "dim"),
            Arg("seq_lens", "int* __restrict__", "output"), Arg("page_table", "int* __restrict__", "output"))
    if plan.kv_dtype:   # float32 [Hkv]: a stored value is the value / its head's scale
        args += (Arg("k_scale", "const float* __restrict__", "input"), Arg("v_scale", "const float* __restrict__", "input"))
    items = _layout(plan)["items_per_token"]
    return KernelABI(name=plan.kernel_name, args=args, grid=(f"cdiv(tokens * {items} + updates, {BLOCK})",),
                     block=(BLOCK,), problem=("tokens", "updates"))


@functools.lru_cache(maxsize=256)
def _source(plan: KVAppendPlan) -> str:
    ctype, to_f32, from_f32, ctype2, from_f32x2 = _DTYPES[plan.dtype]
    rope = None if plan.rope_style is None else RopeSpec(plan.rope_theta, plan.rope_style, plan.rotary_dim,
                                                         plan.rope_scaling)
    return render(
        "cuda/kv_append.cu.jinja", kernel_name=plan.kernel_name, plan_key=plan.key, signature=plan.abi.signature,
        common=read_template("cuda/common.cuh"), ctype=ctype, to_f32=to_f32, from_f32=from_f32,
        ctype2=ctype2, from_f32x2=from_f32x2,
        num_kv_heads=plan.num_kv_heads, head_dim=plan.head_dim, page_size=plan.page_size,
        rope_style=plan.rope_style or "none", rotary_dim=plan._rd,
        rope=rope_context(rope, memory="global"), block=BLOCK, fp8=plan.kv_dtype is not None, **_layout(plan))


def check_rope(style, theta, rotary_dim, head_dim: int) -> None:
    """Raise ValueError unless (style, theta, rotary_dim) is a RoPE the kernel can apply."""
    if style not in _STYLES:
        raise ValueError(f"kv append: rope style must be 'neox' or 'gptj', got {style!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise ValueError(f"kv append: rope theta must be a positive finite number, got {theta!r}")
    rd = rotary_dim
    if not isinstance(rd, int) or isinstance(rd, bool) or rd < 2 or rd % 2 or rd > head_dim:
        raise ValueError(f"kv append: rotary_dim must be an even int in [2, head_dim={head_dim}], got {rd!r}")


def rope_fields(rope, head_dim: int) -> tuple[str, float, int, RopeScaling | None] | None:
    """(style, theta, rotary_dim, scaling) of a `dsl.ir.RopeSpec` whose rotary_dim is a number
    (a specialised attention block's), checked against head_dim; None for None."""
    if rope is None:
        return None
    rd = rope.rotary_dim
    try:
        rd_int = int(rd)
    except TypeError:
        raise ValueError(f"kv append: rotary_dim {rd} is symbolic; use the RopeSpec of a specialised "
                         "attention block (its dims bound)") from None
    if rd_int != rd:
        raise ValueError(f"kv append: rotary_dim must be an integer, got {rd!r}")
    check_rope(rope.style, rope.theta, rd_int, head_dim)
    return rope.style, float(rope.theta), rd_int, as_rope_scaling(getattr(rope, "scaling", None))


def plan_kv_append(dtype: str, num_kv_heads: int, head_dim: int, page_size: int, rope, arch: str,
                   *, vec_bytes: int = 16, kv_dtype: str | None = None) -> KVAppendPlan:
    """The plan for a cache of `dtype` [*, page_size, num_kv_heads, head_dim]; `rope` is a
    `dsl.ir.RopeSpec` with a numeric rotary_dim, or None (K copied as given). kv_dtype
    "fp8_e4m3": K/V of `dtype` stored as scaled e4m3."""
    fields = rope_fields(rope, head_dim) or (None, None, None, None)
    style, theta, rotary_dim, scaling = fields
    return KVAppendPlan(dtype=dtype, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size,
                        rope_style=style, rope_theta=theta, rotary_dim=rotary_dim, rope_scaling=scaling, arch=arch,
                        vec_bytes=vec_bytes, kv_dtype=kv_dtype)
