"""Values the checker passes around besides IR nodes."""
from __future__ import annotations

from .ir import Node, Op
from .types import SCALAR_TYPES, STORAGE_DTYPES, DType

ERR = Node(Op.ERROR, DType.f32, ())  # after a reported error: propagates without new messages


class _Tuple(tuple):
    """Several values (from split, topk or a layer returning several outputs)."""


# names callable as casts: f32(x), bf16(x), T(x), float(x), int(x): the scalar type names; and
# the 8- and 4-bit storage types, whose casts quantise (i8(x), f8e4m3(x), f8e5m2(x), u4(x), i4(x))
_CAST_NAMES = {**SCALAR_TYPES, **STORAGE_DTYPES}
