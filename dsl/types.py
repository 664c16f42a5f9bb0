"""Dtypes and symbolic shapes.

Dims are sympy expressions over positive-integer symbols (`2*F`, `H/Hq`); a specialised
dim is a sympy Integer. Shapes are tuples of dims. `T` is the dtype parameter.
"""
from __future__ import annotations

import enum
from functools import lru_cache
from typing import TYPE_CHECKING

import sympy

if TYPE_CHECKING:   # annotations only: the DSL imports torch where a function needs it
    import torch


class DType(enum.Enum):
    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    f64 = "f64"  # internal: the float64 reference mode; not spelled in the DSL
    i32 = "i32"
    i64 = "i64"
    bool = "bool"
    # 8-bit storage types of quantised tensors (weights, activations): no arithmetic of their own; a
    # layer casts them to a float (f32(q)) and states the scales it multiplies by, and a cast to them
    # quantises (dsl/evaluator.py op_cast: round to nearest even, saturating)
    i8 = "i8"
    f8e4m3 = "f8e4m3"   # float8 e4m3 (torch.float8_e4m3fn: no infinities, largest 448)
    f8e5m2 = "f8e5m2"   # float8 e5m2 (largest finite 57344)
    # 4-bit storage types, packed two a byte along the last axis, the low nibble first: a u4 / i4
    # tensor [.., K] is held as a uint8 tensor [.., K / 2] (K even); values 0..15 / -8..7 (two's
    # complement nibbles). Storage as the 8-bit ones: cast to compute, cast to them to quantise.
    u4 = "u4"
    i4 = "i4"
    T = "T"  # the dtype parameter, bound by specialisation

    @property
    def is_float(self) -> bool:
        return self in (DType.f32, DType.f16, DType.bf16, DType.f64, DType.T)

    @property
    def is_int(self) -> bool:
        return self in (DType.i32, DType.i64)

    @property
    def is_storage(self) -> bool:
        """An 8- or 4-bit storage type: cast it to compute with it."""
        return self in (DType.i8, DType.f8e4m3, DType.f8e5m2, DType.u4, DType.i4)

    @property
    def is_packed(self) -> bool:
        """A 4-bit type: two values a byte along the last axis (uint8 storage, the low nibble first)."""
        return self in (DType.u4, DType.i4)

    @property
    def int_range(self) -> tuple[int, int] | None:
        """(lowest, highest) of an integer storage type; a cast to it rounds and saturates there."""
        return {DType.i8: (-128, 127), DType.u4: (0, 15), DType.i4: (-8, 7)}.get(self)

    @property
    def itemsize(self) -> int:
        return {"f32": 4, "f16": 2, "bf16": 2, "f64": 8, "i32": 4, "i64": 8, "bool": 1, "i8": 1, "f8e4m3": 1,
                "f8e5m2": 1, "u4": 1, "i4": 1}[self.value]   # 4-bit: a byte holds two

    @property
    def torch(self) -> "torch.dtype":
        if self is DType.T:
            raise TypeError("dtype parameter T is unbound")
        return _torch_dtypes()[self]

    def __str__(self) -> str:
        return self.value


@lru_cache(maxsize=None)
def _torch_dtypes() -> dict:
    """DType -> torch dtype; torch is imported here, at first use, so checking DSL source
    (`layerforge check`, `list`) does not import it."""
    import torch
    return {DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16,
            DType.f64: torch.float64, DType.i32: torch.int32, DType.i64: torch.int64, DType.bool: torch.bool,
            DType.i8: torch.int8, DType.f8e4m3: torch.float8_e4m3fn, DType.f8e5m2: torch.float8_e5m2,
            DType.u4: torch.uint8, DType.i4: torch.uint8}   # 4-bit: the packed bytes
STORAGE_DTYPES = {"i8": DType.i8, "f8e4m3": DType.f8e4m3, "f8e5m2": DType.f8e5m2, "u4": DType.u4, "i4": DType.i4}


def unpack_4bit(x: "torch.Tensor", dt: DType) -> "torch.Tensor":
    """A packed u4 / i4 tensor (uint8 [.., K / 2]) -> its values [.., K], low nibble first: uint8 0..15 (u4)
    or int8 -8..7 (i4)."""
    import torch
    v = torch.stack((x & 15, x >> 4), dim=-1).flatten(-2)
    return v if dt is DType.u4 else (v.to(torch.int8) - 16 * (v >= 8).to(torch.int8))


def pack_4bit(v: "torch.Tensor") -> "torch.Tensor":
    """unpack_4bit's inverse: 4-bit values [.., K] (K even; u4 0..15 or i4 -8..7) -> uint8 [.., K / 2]."""
    import torch
    n = (v.to(torch.int16) & 15).to(torch.uint8)
    return n[..., 0::2] | (n[..., 1::2] << 4)
DSL_DTYPES = {"f32": DType.f32, "f16": DType.f16, "bf16": DType.bf16, "i32": DType.i32,
              "i64": DType.i64, "bool": DType.bool, "T": DType.T, **STORAGE_DTYPES}
# Scalar parameter types: `int` and `float` are spellings of i64 and f32 for scalars (no 8-bit scalars).
SCALAR_TYPES = {**{k: v for k, v in DSL_DTYPES.items() if k not in STORAGE_DTYPES}, "int": DType.i64, "float": DType.f32}


def parse_dtype(name: str) -> DType:
    """A user-facing dtype name ('bf16', 'bfloat16', 'float16', ...) -> DType."""
    aliases = {"bfloat16": "bf16", "float16": "f16", "half": "f16", "float32": "f32", "float": "f32",
               "int32": "i32", "int64": "i64"}
    key = aliases.get(name, name)
    if key not in DSL_DTYPES or key == "T" or key in STORAGE_DTYPES:
        raise ValueError(f"unknown dtype '{name}' (expected one of f32, f16, bf16, i32, i64, bool)")
    return DSL_DTYPES[key]


# ---- dims ------------------------------------------------------------------------
Dim = sympy.Expr
Shape = tuple


@lru_cache(maxsize=None)
def dim_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def dims_equal(a: Dim, b: Dim) -> bool:
    if a == b:
        return True
    d = sympy.expand(a - b)
    # Expanded polynomials are canonical and cancel() decides rational functions (H/G), so only
    # other expressions (floor, Min, ...) pay for simplify(), whose first call also imports
    # sympy.physics (0.7 s of `layerforge check`).
    if d.is_Number or d.is_polynomial():
        return d == 0
    if d.is_rational_function():
        return sympy.cancel(d) == 0
    return sympy.simplify(d) == 0


def dim_str(d: Dim) -> str:
    return str(d).replace(" ", "")


def shape_str(shape: Shape) -> str:
    return "[" + ", ".join(dim_str(d) for d in shape) + "]"


def type_str(dtype: DType, shape: Shape) -> str:
    return f"{dtype}{shape_str(shape)}" if shape else f"{dtype} scalar"


def broadcast_shapes(a: Shape, b: Shape) -> Shape | None:
    """numpy broadcasting on symbolic shapes; None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else sympy.Integer(1)
        db = b[-i] if i <= len(b) else sympy.Integer(1)
        if dims_equal(da, db):
            out.append(da)
        elif da == 1:
            out.append(db)
        elif db == 1:
            out.append(da)
        else:
            return None
    return tuple(reversed(out))
