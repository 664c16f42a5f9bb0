"""The kernel ABI: the one description of a generated kernel's interface.

Every kernel family describes each of its `__global__` functions once, as a `KernelABI`:

    args          the ordered parameters: C name, C type, role and what fills them
    grid, block   the launch shape; the grid as expressions over named problem sizes
    shared_bytes  dynamic shared memory (a `SharedLayout` places the buffers in it)

From this one object the template renders its signature (`abi.signature`), the runtime
packs its arguments and computes its grid (`abi.launch_types`, `abi.grid_for`), the build
writes the manifest (`abi.to_json`, read back by `KernelABI.from_json` without the DSL or
NVRTC), and the TensorRT plugin generator writes its launch code (`abi.grid_c`). Nothing
restates a signature, a grid formula or a shared-memory size anywhere else.

Grid expressions are a small, checked subset of Python: names of problem sizes, integer
literals, `+ - * //` and `cdiv(a, b)` (ceiling division), `min`, `max`. They are evaluated
by a compiled lambda at run time and printed as C++ for the plugins.
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Arg", "KernelABI", "SharedLayout", "ROLES", "TENSOR_MAP_CTYPE", "GridExprError"]

# What the launcher puts in an argument:
#   input / output   a tensor's data pointer (ref: the tensor's name, or an output's index)
#   table            an extra read-only tensor of an attention block (bias tables, lengths)
#   workspace        scratch the launcher allocates (split-KV partial results)
#   dim              an integer size (ref: the dim or problem variable it carries)
#   scalar           a runtime scalar parameter of the layer (ref: its name)
#   tmap             a TMA tensor map over an input tensor, passed by value (ref: the tensor's
#                    name; the launcher encodes it, runtime/tma.py)
ROLES = ("input", "output", "table", "workspace", "dim", "scalar", "tmap")

# C parameter types -> the driver's argument kinds (runtime/driver.py). A tensor map is a
# 128-byte, 64-byte-aligned struct the kernel reads from the parameter space: it must be
# `const __grid_constant__` (the address of a by-value parameter is then the parameter's own,
# which TMA needs), and the driver copies its 128 bytes at launch.
TENSOR_MAP_CTYPE = "const __grid_constant__ lf_tensor_map"
_LAUNCH_TYPES = {"int": "i32", "unsigned": "u32", "long long": "i64", "unsigned long long": "u64",
                 "float": "f32", "double": "f64", "bool": "bool", "__grid_constant__ lf_tensor_map": "tmap"}


class GridExprError(ValueError):
    """A grid expression outside the allowed subset."""


@dataclass(frozen=True)
class Arg:
    name: str     # C identifier in the kernel
    ctype: str    # C type as declared: "const __nv_bfloat16* __restrict__", "int", "long long"
    role: str     # one of ROLES
    ref: str = "" # the tensor, output index, dim or scalar that fills it (default: the name)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"{self.name}: role must be one of {ROLES}, got {self.role!r}")
        if not self.name.isidentifier():
            raise ValueError(f"argument name {self.name!r} is not a C identifier")
        if (self.role == "tmap") != (self.ctype == TENSOR_MAP_CTYPE):
            raise ValueError(f"{self.name}: a tensor map has role 'tmap' and C type {TENSOR_MAP_CTYPE!r}, "
                             f"got {self.role!r}, {self.ctype!r}")
        if not self.ref:
            object.__setattr__(self, "ref", self.name)
        self.launch_type  # validates the C type

    @property
    def is_pointer(self) -> bool:
        return self.ctype.rstrip().endswith(("*", "* __restrict__"))

    @property
    def launch_type(self) -> str:
        """The driver argument kind: 'ptr', 'i32', 'i64', 'f32', ..."""
        if self.is_pointer:
            return "ptr"
        t = self.ctype.replace("const ", "").strip()
        if t not in _LAUNCH_TYPES:
            raise ValueError(f"{self.name}: no launch type for C type {self.ctype!r}")
        return _LAUNCH_TYPES[t]


@dataclass(frozen=True)
class KernelABI:
    name: str                          # extern "C" symbol
    args: tuple[Arg, ...]
    grid: tuple[str, str, str]         # expressions over `problem`
    block: tuple[int, int, int]
    shared_bytes: int = 0              # dynamic shared memory per block
    problem: tuple[str, ...] = ()      # the problem sizes the grid depends on, in call order
    pdl: bool = False                  # launched as a programmatic dependent launch (sm_90; the kernel
                                       # runs griddepcontrol.wait before touching its predecessor's data)

    def __post_init__(self):
        object.__setattr__(self, "args", tuple(self.args))
        object.__setattr__(self, "grid", tuple(str(g) for g in (*self.grid, "1", "1")[:3]))
        object.__setattr__(self, "block", tuple(int(b) for b in (*self.block, 1, 1)[:3]))
        object.__setattr__(self, "problem", tuple(self.problem))
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: duplicate argument names {names}")
        for g in self.grid:
            unknown = _names(g) - set(self.problem)
            if unknown:
                raise GridExprError(f"{self.name}: grid expression {g!r} uses {sorted(unknown)}, "
                                    f"not among the problem sizes {list(self.problem)}")

    # ---- the template's side -------------------------------------------------------------
    @property
    def signature(self) -> str:
        """The C parameter list, one parameter a line."""
        return ",\n    ".join(f"{a.ctype} {a.name}" for a in self.args)

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    # ---- the launcher's side -------------------------------------------------------------
    @property
    def launch_types(self) -> tuple[str, ...]:
        return tuple(a.launch_type for a in self.args)

    def arg(self, name: str) -> Arg:
        for a in self.args:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no argument {name!r}")

    @property
    def grid_for(self) -> Callable[..., tuple[int, int, int]]:
        """grid_for(**problem sizes) -> (gx, gy, gz); positional calls follow `problem`."""
        return _grid_function(self.grid, self.problem)

    @property
    def grid_c(self) -> tuple[str, str, str]:
        """The grid as C++ expressions (cdiv -> lf_cdiv, min/max -> lf_min/lf_max)."""
        return tuple(_to_c(g) for g in self.grid)

    # ---- the manifest's side -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "args": [[a.name, a.ctype, a.role, a.ref] for a in self.args],
                "grid": list(self.grid), "block": list(self.block), "shared_bytes": self.shared_bytes,
                "problem": list(self.problem), **({"pdl": True} if self.pdl else {})}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelABI:
        return cls(name=d["name"], args=tuple(Arg(*a) for a in d["args"]), grid=tuple(d["grid"]),
                   block=tuple(d["block"]), shared_bytes=int(d["shared_bytes"]), problem=tuple(d["problem"]),
                   pdl=bool(d.get("pdl", False)))


@dataclass(frozen=True)
class SharedLayout:
    """Buffers in a kernel's dynamic shared memory, in order, each aligned: the template
    takes the offsets (`layout.offsets`), the ABI the total (`layout.bytes`)."""

    buffers: tuple[tuple[str, int], ...]   # (name, bytes)
    align: int = 128
    offsets: dict[str, int] = field(init=False, compare=False, hash=False)
    bytes: int = field(init=False, compare=False, hash=False)

    def __post_init__(self):
        offsets, at = {}, 0
        for name, size in self.buffers:
            at = -(-at // self.align) * self.align
            offsets[name] = at
            at += size
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "bytes", at)


# ---- grid expressions ------------------------------------------------------------------------
_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Name, ast.Load,
            ast.Constant, ast.Call)
_FUNCS = {"cdiv": 2, "min": 2, "max": 2}


def _parse(expr: str) -> ast.Expression:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise GridExprError(f"grid expression {expr!r}: {e.msg}") from None
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise GridExprError(f"grid expression {expr!r}: {type(node).__name__} is not allowed")
        if isinstance(node, ast.Constant) and (not isinstance(node.value, int) or isinstance(node.value, bool)):
            raise GridExprError(f"grid expression {expr!r}: only integer literals")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or _FUNCS.get(node.func.id) != len(node.args) or node.keywords:
                raise GridExprError(f"grid expression {expr!r}: calls are cdiv(a, b), min(a, b), max(a, b)")
    return tree


def _names(expr: str) -> set[str]:
    return {n.id for n in ast.walk(_parse(expr)) if isinstance(n, ast.Name) and n.id not in _FUNCS}


@functools.lru_cache(maxsize=None)
def _grid_function(grid: tuple[str, ...], problem: tuple[str, ...]) -> Callable[..., tuple[int, int, int]]:
    # cdiv inlined as -(-a // b): the grid is computed on every launch's host path
    src = f"lambda {', '.join(problem)}: ({', '.join(_ToPython().visit(_parse(g)) for g in grid)},)"
    return eval(compile(src, "<grid>", "eval"), {"__builtins__": {}, "min": min, "max": max})


class _ToC(ast.NodeVisitor):
    _OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "/"}   # sizes are non-negative

    def visit_Expression(self, n):
        return self.visit(n.body)

    def visit_BinOp(self, n):
        return f"({self.visit(n.left)} {self._OPS[type(n.op)]} {self.visit(n.right)})"

    def visit_Name(self, n):
        return n.id

    def visit_Constant(self, n):
        return str(n.value)

    def visit_Call(self, n):
        return f"lf_{n.func.id}({', '.join(self.visit(a) for a in n.args)})"


class _ToPython(_ToC):
    _OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//"}

    def visit_Call(self, n):
        a, b = (self.visit(x) for x in n.args)
        return f"(-(-{a} // {b}))" if n.func.id == "cdiv" else f"{n.func.id}({a}, {b})"


def _to_c(expr: str) -> str:
    return _ToC().visit(_parse(expr))
