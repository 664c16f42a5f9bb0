"""The parser: frozen AST nodes with exact spans, Python-like precedence, one cached grammar."""
from __future__ import annotations

import dataclasses
import inspect

import pytest

from layerforge import DSLError
from layerforge.dsl import ast
from layerforge.dsl import parser as parser_mod
from layerforge.dsl.parser import grammar_parser, parse
from layerforge.dsl.program import stdlib_sources
from layerforge.dsl.source import Span

FILE = "p.lf"


def parse_expr(expr: str) -> tuple[ast.Expr, str]:
    """Parse `expr` as the returned value of a layer; returns the node and the full source."""
    text = f"layer f() -> f32 {{\n    return {expr}\n}}\n"
    prog = parse(text, FILE)
    (layer,) = prog.items
    (ret,) = layer.body
    (value,) = ret.values
    return value, text


def snippet(span: Span, text: str) -> str:
    """The source text a single-line span covers."""
    assert span.line == span.end_line
    return text.splitlines()[span.line - 1][span.col - 1:span.end_col - 1]


def show(e: ast.Expr) -> str:
    """Fully parenthesised rendering: shows how the parser grouped an expression."""
    if isinstance(e, ast.BinOp):
        return f"({show(e.left)} {e.op} {show(e.right)})"
    if isinstance(e, ast.UnaryOp):
        return f"(not {show(e.operand)})" if e.op == "not" else f"(-{show(e.operand)})"
    if isinstance(e, ast.IfExp):
        return f"({show(e.then)} if {show(e.cond)} else {show(e.other)})"
    if isinstance(e, ast.Call):
        args = [show(a) for a in e.args] + [f"{k.name}={show(k.value)}" for k in e.kwargs]
        return f"{show(e.func)}({', '.join(args)})"
    if isinstance(e, ast.Attr):
        return f"{show(e.base)}.{e.name}"
    if isinstance(e, ast.Index):
        return f"{show(e.base)}[{', '.join(show(i) for i in e.indices)}]"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.BoolLit):
        return "true" if e.value else "false"
    if isinstance(e, (ast.IntLit, ast.FloatLit)):
        return repr(e.value)
    raise AssertionError(f"unexpected node {e!r}")


def walk(node):
    """Every AST node under `node` (depth first), found through the dataclass fields."""
    yield node
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, ast.Node):
                yield from walk(v)


# ---- AST nodes -----------------------------------------------------------------------------

AST_CLASSES = [c for _, c in inspect.getmembers(ast, inspect.isclass)
               if issubclass(c, ast.Node) and c.__module__ == ast.__name__]


def test_ast_module_defines_the_expected_node_kinds():
    names = {c.__name__ for c in AST_CLASSES}
    assert {"Program", "LayerDef", "AttentionDef", "Param", "Assign", "Return", "AttnCall", "BinOp", "UnaryOp",
            "IfExp", "Call", "KwArg", "Index", "Attr", "Name", "IntLit", "FloatLit", "BoolLit", "ListLit",
            "TensorTypeExpr", "ScalarTypeExpr", "DimName", "DimInt", "DimBin", "DimsDecl", "ConstDecl"} <= names


@pytest.mark.parametrize("cls", AST_CLASSES, ids=lambda c: c.__name__)
def test_every_ast_node_is_a_frozen_dataclass_with_a_span(cls):
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen
    assert dataclasses.fields(cls)[0].name == "span"


def test_ast_nodes_cannot_be_mutated():
    e, _ = parse_expr("a + b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.op = "-"


def test_ast_nodes_compare_and_hash_by_value():
    a, _ = parse_expr("exp(x) * 2.0")
    b, _ = parse_expr("exp(x) * 2.0")
    assert a == b and hash(a) == hash(b)


def test_every_node_of_the_standard_library_has_a_real_span():
    for source in stdlib_sources():
        prog = parse(source.text, source.name)
        lines = source.text.splitlines()
        for item in prog.items:
            for node in walk(item):
                s = node.span
                assert s.file == source.name
                assert 1 <= s.line <= s.end_line <= len(lines), node
                assert s.col >= 1 and (s.end_line > s.line or s.end_col > s.col), node


# ---- spans -------------------------------------------------------------------------------------

LAYER = """\
dims H
dynamic N
layer mix(x: f32[N, 2*H], const k: int = 2) -> (f32[N, H], i32[N, 1]) {
    y = -x ** 2 + softmax(x, axis=-1) * 3.0
    return y, x
}
"""


@pytest.fixture(scope="module")
def layer() -> ast.LayerDef:
    return parse(LAYER, FILE).items[2]


def test_top_level_items_keep_their_order_and_kind():
    prog = parse(LAYER, FILE)
    assert [type(i).__name__ for i in prog.items] == ["DimsDecl", "DimsDecl", "LayerDef"]
    assert [n.id for n in prog.items[0].names] == ["H"] and not prog.items[0].dynamic
    assert [n.id for n in prog.items[1].names] == ["N"] and prog.items[1].dynamic


def test_layer_span_covers_the_whole_definition(layer):
    assert layer.span == Span(FILE, 3, 1, 6, 2)
    assert layer.name == "mix" and snippet(layer.name_span, LAYER) == "mix"


def test_parameter_spans(layer):
    x, k = layer.params
    assert snippet(x.span, LAYER) == "x: f32[N, 2*H]"
    assert snippet(x.type.span, LAYER) == "f32[N, 2*H]"
    assert x.type.dtype == "f32" and not x.is_const and x.default is None
    n, two_h = x.type.dims
    assert isinstance(n, ast.DimName) and snippet(n.span, LAYER) == "N"
    assert isinstance(two_h, ast.DimBin) and two_h.op == "*" and snippet(two_h.span, LAYER) == "2*H"
    assert snippet(k.span, LAYER) == "const k: int = 2"
    assert k.is_const and isinstance(k.type, ast.ScalarTypeExpr) and k.type.name == "int"
    assert isinstance(k.default, ast.IntLit) and k.default.value == 2


def test_return_type_spans(layer):
    assert [snippet(t.span, LAYER) for t in layer.returns] == ["f32[N, H]", "i32[N, 1]"]
    assert isinstance(layer.returns[1].dims[1], ast.DimInt)


def test_statement_and_expression_spans(layer):
    assign, ret = layer.body
    assert snippet(assign.span, LAYER) == "y = -x ** 2 + softmax(x, axis=-1) * 3.0"
    assert [t.id for t in assign.targets] == ["y"]
    add = assign.value
    assert snippet(add.span, LAYER) == "-x ** 2 + softmax(x, axis=-1) * 3.0"
    neg, mul = add.left, add.right
    assert snippet(neg.span, LAYER) == "-x ** 2"
    assert snippet(neg.operand.span, LAYER) == "x ** 2"
    call = mul.left
    assert snippet(call.span, LAYER) == "softmax(x, axis=-1)"
    assert snippet(call.func.span, LAYER) == "softmax"
    (kw,) = call.kwargs
    assert kw.name == "axis" and snippet(kw.span, LAYER) == "axis=-1" and snippet(kw.value.span, LAYER) == "-1"
    assert snippet(mul.right.span, LAYER) == "3.0"
    assert snippet(ret.span, LAYER) == "return y, x"
    assert [snippet(v.span, LAYER) for v in ret.values] == ["y", "x"]


def test_span_of_a_multi_line_expression():
    text = "layer f(a: f32, b: f32) -> f32 {\n    return a +\n        b\n}\n"
    (ret,) = parse(text, FILE).items[0].body
    assert ret.values[0].span == Span(FILE, 2, 12, 3, 10)


def test_attention_block_nodes():
    text = ("dims Hq, D\ndynamic S\n"
            "attention a(q: T[S, Hq, D], k: T[S, Hq, D], v: T[S, Hq, D]) -> T[S, Hq, D] {\n"
            "    rope(theta = 10000.0, style = neox)\n"
            "    mask = q_pos >= kv_pos\n"
            "}\n")
    att = parse(text, FILE).items[2]
    assert isinstance(att, ast.AttentionDef) and att.name == "a"
    rope, mask = att.body
    assert isinstance(rope, ast.AttnCall) and rope.name == "rope" and rope.args == ()
    assert [k.name for k in rope.kwargs] == ["theta", "style"]
    assert snippet(rope.span, text) == "rope(theta = 10000.0, style = neox)"
    assert isinstance(mask, ast.Assign) and show(mask.value) == "(q_pos >= kv_pos)"


# ---- literals and small syntax ------------------------------------------------------------------

@pytest.mark.parametrize("text, cls, value", [
    ("2", ast.IntLit, 2), ("1e-5", ast.FloatLit, 1e-5), ("2.5", ast.FloatLit, 2.5), (".5", ast.FloatLit, 0.5),
    ("3.", ast.FloatLit, 3.0), ("1E3", ast.FloatLit, 1000.0), ("true", ast.BoolLit, True),
    ("false", ast.BoolLit, False),
])
def test_literals(text, cls, value):
    e, src = parse_expr(text)
    assert type(e) is cls and e.value == value and snippet(e.span, src) == text


def test_unary_plus_is_dropped():
    e, src = parse_expr("+x")
    assert isinstance(e, ast.Name) and snippet(e.span, src) == "x"


def test_comments_blank_lines_and_trailing_commas():
    text = ("# header\n\ndims H, F,   # trailing comma\n"
            "layer f(x: f32[H, F,],) -> f32[H, F] {  # comment\n    return x  # done\n}\n")
    prog = parse(text, FILE)
    assert [n.id for n in prog.items[0].names] == ["H", "F"]
    assert len(prog.items[1].params[0].type.dims) == 2


def test_split_sections_as_a_list():
    e, _ = parse_expr("split(x, [1, 3], axis=-1)")
    assert isinstance(e.args[1], ast.ListLit) and [i.value for i in e.args[1].items] == [1, 3]


def test_positional_and_keyword_arguments_are_kept_apart():
    e, _ = parse_expr("topk(p, 2, axis=-1)")
    assert [show(a) for a in e.args] == ["p", "2"] and [k.name for k in e.kwargs] == ["axis"]


# ---- precedence ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, grouped", [
    ("-a ** 2", "(-(a ** 2))"),
    ("a ** -b", "(a ** (-b))"),
    ("a ** b ** c", "(a ** (b ** c))"),
    ("a + b * c", "(a + (b * c))"),
    ("a * b + c", "((a * b) + c)"),
    ("a - b - c", "((a - b) - c)"),
    ("a / b / c", "((a / b) / c)"),
    ("a // b % c", "((a // b) % c)"),
    ("a @ b.T * s", "((a @ b.T) * s)"),
    ("-x.T", "(-x.T)"),
    ("(a + b) * c", "((a + b) * c)"),
    ("-a * b", "((-a) * b)"),
    ("a + b < c * d", "((a + b) < (c * d))"),
    ("a == b + 1", "(a == (b + 1))"),
    ("not a < b", "(not (a < b))"),
    ("not a and b", "((not a) and b)"),
    ("a or b and c", "(a or (b and c))"),
    ("a and b or c and d", "((a and b) or (c and d))"),
    ("not not a", "(not (not a))"),
    ("x if c else y", "(x if c else y)"),
    ("x if c else y if d else z", "(x if c else (y if d else z))"),
    ("a or b if c and d else e", "((a or b) if (c and d) else e)"),
    ("x + 1 if c else y", "((x + 1) if c else y)"),
    ("f(a, b=c + 1)[h, kv_pos - 1].T", "f(a, b=(c + 1))[h, (kv_pos - 1)].T"),
    ("q_pos >= kv_pos and q_pos - kv_pos < w", "((q_pos >= kv_pos) and ((q_pos - kv_pos) < w))"),
])
def test_precedence_and_associativity(text, grouped):
    e, _ = parse_expr(text)
    assert show(e) == grouped


def test_ternary_fields_are_condition_then_other():
    e, src = parse_expr("x if c else y")
    assert isinstance(e, ast.IfExp)
    assert (show(e.cond), show(e.then), show(e.other)) == ("c", "x", "y")
    assert snippet(e.span, src) == "x if c else y"


def test_comparisons_do_not_chain():
    with pytest.raises(DSLError) as info:
        parse_expr("a < b < c")
    (d,) = info.value.diagnostics
    assert (d.span.line, d.span.col) == (2, 18)


# ---- the grammar is loaded once -------------------------------------------------------------------

def test_grammar_parser_is_cached():
    assert grammar_parser() is grammar_parser()


def test_parsing_does_not_rebuild_the_grammar(monkeypatch):
    grammar_parser()  # built (at most) once, before the patch

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the grammar was rebuilt")

    monkeypatch.setattr(parser_mod, "Lark", no_rebuild)
    parse(LAYER, FILE)
    with pytest.raises(DSLError):
        parse("layer f( {", FILE)  # error recovery re-parses pieces with the same parser
    assert grammar_parser.cache_info().currsize == 1


def test_grammar_ships_as_package_data():
    from importlib import resources
    text = resources.files("layerforge.grammars").joinpath("layerforge.lark").read_text()
    assert "layer_def" in text and "attention_def" in text
