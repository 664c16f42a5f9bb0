"""The op table: how each IR operation is spelled in CUDA C.

Values are computed in `float` for every float dtype (f32, f16, bf16), in `int` / `long long`
for integers and `bool` for predicates. A node whose dtype is a half type is rounded to it
(`lf_round_bf16`), so the kernel computes what the program says, as the reference does.
"""
from __future__ import annotations

import re

from ..dsl.ir import Node, Op
from ..dsl.types import DType

C_TYPE = {DType.f32: "float", DType.f16: "float", DType.bf16: "float", DType.i32: "int",
          DType.i64: "long long", DType.bool: "bool"}
STORAGE_TYPE = {DType.f32: "float", DType.f16: "__half", DType.bf16: "__nv_bfloat16", DType.i32: "int",
                DType.i64: "long long", DType.bool: "bool"}
LOAD = {DType.f32: "{}", DType.f16: "__half2float({})", DType.bf16: "__bfloat162float({})",
        DType.i32: "{}", DType.i64: "{}", DType.bool: "{}"}
STORE = {DType.f32: "{}", DType.f16: "__float2half_rn({})", DType.bf16: "__float2bfloat16_rn({})",
         DType.i32: "{}", DType.i64: "{}", DType.bool: "{}"}
ROUND = {DType.f16: "lf_round_f16({})", DType.bf16: "lf_round_bf16({})"}

# The 8-bit storage types, in the row kernels only (codegen/row.py; the other families keep refusing
# them, so these are not in the tables above): a value of one is held as its storage, an i8 as its
# integer (int), an f8e4m3 as its byte (torch.float8_e4m3fn's code). Casts convert, with
# templates/cuda/quant8.cuh's helpers (the evaluator's op_cast: nearest even, saturating).
Q8_C_TYPE = {DType.i8: "int", DType.f8e4m3: "unsigned char"}
Q8_STORAGE_TYPE = {DType.i8: "signed char", DType.f8e4m3: "unsigned char"}
ROW_C_TYPE = {**C_TYPE, **Q8_C_TYPE}
ROW_STORAGE_TYPE = {**STORAGE_TYPE, **Q8_STORAGE_TYPE}
ROW_LOAD = {**LOAD, DType.i8: "(int)({})", DType.f8e4m3: "{}"}
ROW_STORE = {**STORE, DType.i8: "(signed char)({})", DType.f8e4m3: "{}"}


def storage_ctype(dtype: str) -> str:
    """The C type a tensor of DSL dtype `dtype` ("bf16", ...) is stored as."""
    return STORAGE_TYPE[DType[dtype]]


def arch_number(arch: str) -> int:
    """'sm_90a' -> 90; anything not shaped like an arch is a ValueError."""
    m = re.fullmatch(r"sm_(\d+)[af]?", arch)
    if m is None:
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return int(m.group(1))


# Dynamic shared memory one CTA can opt in to, by compute capability (CUDA's "maximum shared memory per block,
# opt-in"): A100 / Orin 163 KB; the sm_86 / sm_89 / sm_120 cards (A10, L4, L40S, RTX 30 / 40 / 50) 99 KB; Hopper and
# datacenter Blackwell 227 KB. An arch not listed gets 99 KB, what every sm_80+ part has.
SHARED_LIMITS = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448, 101: 232448,
                 103: 232448, 110: 232448, 120: 101376, 121: 101376}


def shared_limit(arch: str) -> int:
    """Bytes of dynamic shared memory a CTA can have on `arch` (SHARED_LIMITS; 99 KB where not listed)."""
    return SHARED_LIMITS.get(arch_number(arch), 101376)


def arch_key(arch: str) -> str:
    """The arch as kernel keys spell it: 'sm_90a' -> 'sm90a'."""
    return arch.replace("_", "")

UNARY_FLOAT = {
    "neg": "(-{x})",
    "exp": "__expf({x})",
    "log": "__logf({x})",
    "tanh": "tanhf({x})",
    "sigmoid": "lf_sigmoid({x})",
    "silu": "lf_silu({x})",
    "gelu": "lf_gelu({x})",
    "gelu_tanh": "lf_gelu_tanh({x})",
    "relu": "fmaxf({x}, 0.0f)",
    "rsqrt": "rsqrtf({x})",
    "sqrt": "sqrtf({x})",
    "abs": "fabsf({x})",
    "cos": "cosf({x})",
    "sin": "sinf({x})",
    "erf": "erff({x})",
}
UNARY_INT = {"neg": "(-{x})", "abs": "abs({x})", "not": "(!{x})", "relu": "max({x}, 0)"}

BINARY_FLOAT = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "div": "({a} / {b})",
    "floordiv": "floorf({a} / {b})", "mod": "lf_fmod_floor({a}, {b})", "pow": "powf({a}, {b})",
    "max": "fmaxf({a}, {b})", "min": "fminf({a}, {b})",
}
BINARY_INT = {
    "add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})", "floordiv": "lf_floordiv({a}, {b})",
    "mod": "lf_mod_floor({a}, {b})", "max": "max({a}, {b})", "min": "min({a}, {b})",
}

def const_divisor(n: Node) -> int | None:
    """The divisor (second operand) of an IR binary node where it is an integer constant, for int_binary."""
    d = n.src[1]
    return int(d.arg) if d.op is Op.CONST and d.dtype.is_int else None


def int_binary(op: str, a: str, b: str, ctype: str, divisor: int | None = None) -> str:
    """An integer binary op of the kernels' emitters (row kernels, attention hooks), both operands in
    the result's C type (min/max and the floor helpers take one integer type: `max(long long, int)` is
    ambiguous). `divisor`: the constant divisor of a floordiv / mod, where it is one; by 2^k they are
    the arithmetic shift and the low bits (the floor semantics for negative dividends too), not the
    floor helpers' division sequence."""
    x, y = f"({ctype})({a})", f"({ctype})({b})"
    if op in ("floordiv", "mod") and divisor is not None and divisor > 0 and divisor & (divisor - 1) == 0:
        k = divisor.bit_length() - 1
        return f"({x} >> {k})" if op == "floordiv" else f"({x} & ({ctype})({divisor - 1}))"
    return BINARY_INT[op].format(a=x, b=y)


COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
LOGICAL = {"and": "({a} && {b})", "or": "({a} || {b})"}

REDUCE_INIT = {"sum": "0.0f", "mean": "0.0f", "max": "-INFINITY", "min": "INFINITY"}
REDUCE_COMBINE = {"sum": "({a} + {b})", "mean": "({a} + {b})", "max": "fmaxf({a}, {b})", "min": "fminf({a}, {b})"}
REDUCE_INIT_INT = {"sum": "0", "max": "INT_MIN", "min": "INT_MAX"}
REDUCE_INIT_I64 = {"sum": "0LL", "max": "(-9223372036854775807LL - 1)", "min": "9223372036854775807LL"}
REDUCE_COMBINE_INT = {"sum": "({a} + {b})", "max": "max({a}, {b})", "min": "min({a}, {b})"}


def float_literal(v: float) -> str:
    if v == float("inf"):
        return "INFINITY"
    if v == float("-inf"):
        return "(-INFINITY)"
    r = repr(float(v))
    if "e" not in r and "." not in r:
        r += ".0"
    return f"{r}f"
