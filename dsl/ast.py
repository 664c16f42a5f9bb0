"""The AST: frozen dataclasses, each carrying the span of source it came from."""
from __future__ import annotations

from dataclasses import dataclass

from .source import Span


@dataclass(frozen=True)
class Node:
    span: Span


# ---- dims in types ---------------------------------------------------------------
@dataclass(frozen=True)
class DimName(Node):
    name: str


@dataclass(frozen=True)
class DimInt(Node):
    value: int


@dataclass(frozen=True)
class DimBin(Node):
    op: str  # + - * /
    left: "DimExpr"
    right: "DimExpr"


DimExpr = DimName | DimInt | DimBin


# ---- types -----------------------------------------------------------------------
@dataclass(frozen=True)
class TensorTypeExpr(Node):
    dtype: str
    dims: tuple[DimExpr, ...]


@dataclass(frozen=True)
class ScalarTypeExpr(Node):
    name: str


TypeExpr = TensorTypeExpr | ScalarTypeExpr


# ---- expressions -----------------------------------------------------------------
@dataclass(frozen=True)
class Name(Node):
    id: str


@dataclass(frozen=True)
class IntLit(Node):
    value: int


@dataclass(frozen=True)
class FloatLit(Node):
    value: float


@dataclass(frozen=True)
class BoolLit(Node):
    value: bool


@dataclass(frozen=True)
class ListLit(Node):
    items: tuple["Expr", ...]


@dataclass(frozen=True)
class BinOp(Node):
    op: str  # + - * / // % @ ** and or == != < <= > >=
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class UnaryOp(Node):
    op: str  # - not
    operand: "Expr"


@dataclass(frozen=True)
class IfExp(Node):
    cond: "Expr"
    then: "Expr"
    other: "Expr"


@dataclass(frozen=True)
class KwArg(Node):
    name: str
    value: "Expr"


@dataclass(frozen=True)
class Call(Node):
    func: "Expr"
    args: tuple["Expr", ...]
    kwargs: tuple[KwArg, ...]


@dataclass(frozen=True)
class Index(Node):
    base: "Expr"
    indices: tuple["Expr", ...]


@dataclass(frozen=True)
class Attr(Node):
    base: "Expr"
    name: str


Expr = Name | IntLit | FloatLit | BoolLit | ListLit | BinOp | UnaryOp | IfExp | Call | Index | Attr


# ---- statements and definitions --------------------------------------------------
@dataclass(frozen=True)
class Assign(Node):
    targets: tuple[Name, ...]
    value: Expr


@dataclass(frozen=True)
class Return(Node):
    values: tuple[Expr, ...]


@dataclass(frozen=True)
class AttnCall(Node):
    """A directive inside an attention block: `rope(...)`, `alibi(...)`."""

    name: str
    args: tuple[Expr, ...]
    kwargs: tuple[KwArg, ...]


Stmt = Assign | Return | AttnCall


@dataclass(frozen=True)
class Param(Node):
    name: str
    type: TypeExpr
    default: Expr | None
    is_const: bool
    is_state: bool = False   # `state s: T[...]`: read and reassigned by the layer, kept across calls


@dataclass(frozen=True)
class DimsDecl(Node):
    names: tuple[Name, ...]
    dynamic: bool


@dataclass(frozen=True)
class ConstDecl(Node):
    name: str
    type: ScalarTypeExpr
    value: Expr


@dataclass(frozen=True)
class LayerDef(Node):
    name: str
    name_span: Span
    params: tuple[Param, ...]
    returns: tuple[TypeExpr, ...]
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class AttentionDef(Node):
    name: str
    name_span: Span
    params: tuple[Param, ...]
    returns: TensorTypeExpr
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class Program(Node):
    items: tuple[DimsDecl | ConstDecl | LayerDef | AttentionDef, ...]
