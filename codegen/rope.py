"""The RoPE data every rotating template needs (templates/cuda/rope.cuh.jinja): the frequency
table of dsl/numerics as C double literals, the pair layout and the attention factor.

Kernels carry one constant table, so a rope type whose frequencies follow the sequence length
(dynamic NTK, LongRoPE without a fixed regime) is a LoweringError naming the type.
"""
from __future__ import annotations

import sympy

from ..dsl.numerics import (RopeNotStatic, as_rope_scaling, rope_attention_factor, rope_scaling_key,
                            static_inv_freq)


class RopeLoweringError(NotImplementedError):
    """A RoPE that no constant-table kernel can apply (its frequencies depend on the length)."""


def static_table(theta: float, rotary_dim: int, scaling) -> tuple[float, ...]:
    try:
        return static_inv_freq(theta, rotary_dim, scaling)
    except RopeNotStatic as e:
        raise RopeLoweringError(f"rope type '{as_rope_scaling(scaling).rope_type}': {e}") from None


def rope_context(rope, memory: str = "constant") -> dict | None:
    """Template data of a `dsl.ir.RopeSpec` with a numeric rotary_dim (None: no rope).
    memory: where the table lives, "constant" (a warp reads one entry at a time) or "global"
    (threads read different entries; cached loads, 16-byte aligned)."""
    if rope is None:
        return None
    rd = sympy.sympify(rope.rotary_dim)
    if not rd.is_Integer:
        raise ValueError(f"rotary_dim {rd} is symbolic; specialise the block first")
    rd = int(rd)
    scale = rope_attention_factor(rope.scaling)
    return {"style": rope.style, "rdim": rd, "memory": memory,
            "inv_freq": ", ".join(repr(x) for x in static_table(float(rope.theta), rd, rope.scaling)),
            "scale": None if scale == 1.0 else repr(scale) + "f",
            "kind": rope_scaling_key(rope.scaling) or "default"}
