"""Parse DSL text into the AST (lark LALR, grammar loaded once, positions kept).

Syntax errors become diagnostics with a human sentence; after an error the parser resumes
at the next top-level definition so that every broken definition in a file is reported.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast
from .errors import Diagnostic, DiagnosticSink, DSLError
from .source import SourceFile, Span

MAX_IDENTIFIER = 64
MAX_NESTING = 200  # syntax-tree levels; deeper trees would exhaust Python's recursion limit
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# keywords only where a parameter starts (`state s: T[N]`); elsewhere they are names (`state=` in a call)
SOFT_KEYWORDS = ("STATE_KW",)
_TOP_LEVEL = re.compile(r"^(layer|attention|dims|dynamic|const)\b", re.M)

# Terminal names as a person would say them.
_TOKEN_WORDS = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'", "RBRACE": "'}'", "COMMA": "','",
    "COLON": "':'", "EQUAL": "'='", "MINUS": "'-'", "PLUS": "'+'", "STAR": "'*'",
    "SLASH": "'/'", "MORETHAN": "'>'", "COMP_OP": "a comparison", "DOT": "'.'",
    "RETURN": "'return'", "LAYER": "'layer'", "ATTENTION": "'attention'", "$END": "end of file",
    "CONST_KW": "'const'", "STATE_KW": "'state'", "DIMS": "'dims'", "DYNAMIC": "'dynamic'", "CONST": "'const'",
    "__ANON_0": "'->'",
}


@functools.lru_cache(maxsize=1)
def grammar_parser() -> Lark:
    text = resources.files("layerforge.grammars").joinpath("layerforge.lark").read_text()
    keywords: dict[str, str] = {}

    def reserve_keywords(tok: Token) -> Token:
        # The contextual lexer only knows the keywords a parser state accepts, so in
        # `y = x *  return y` it would read `return` as a name and fail far away.
        kind = keywords.get(str(tok))
        return tok if kind is None else Token.new_borrow_pos(kind, str(tok), tok)

    parser = Lark(text, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=True,
                  lexer_callbacks={"NAME": reserve_keywords})
    keywords.update({t.pattern.value: t.name for t in parser.terminals
                     if t.pattern.type == "str" and _IDENTIFIER.fullmatch(t.pattern.value) and t.name not in SOFT_KEYWORDS})
    return parser


class _UserError(Exception):
    def __init__(self, span: Span, message: str, hint: str | None = None):
        super().__init__(message)
        self.span, self.message, self.hint = span, message, hint


def _check_identifier(tok: Token, file: str) -> str:
    name = str(tok)
    if len(name) > MAX_IDENTIFIER:
        raise _UserError(_tok_span(tok, file), f"identifier is longer than {MAX_IDENTIFIER} characters")
    if name.startswith("__"):
        raise _UserError(_tok_span(tok, file), f"identifier '{name}' may not start with '__' (reserved)")
    return name


def _tok_span(tok: Token, file: str) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(tok))


class _ToAst(Transformer):
    """lark tree -> frozen AST nodes with spans."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", True):
            return Span(self.file, 0, 0, 0, 0)
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(_tok_span(tok, self.file), _check_identifier(tok, self.file))

    # ---- top level
    @v_args(meta=True)
    def start(self, meta, items):
        return ast.Program(self._span(meta), tuple(items))

    @v_args(meta=True)
    def dims_decl(self, meta, names):
        return ast.DimsDecl(self._span(meta), tuple(self._name(n) for n in names), dynamic=False)

    @v_args(meta=True)
    def dynamic_decl(self, meta, names):
        return ast.DimsDecl(self._span(meta), tuple(self._name(n) for n in names), dynamic=True)

    @v_args(meta=True)
    def const_decl(self, meta, c):
        name, typ, value = c
        return ast.ConstDecl(self._span(meta), _check_identifier(name, self.file), typ, value)

    @v_args(meta=True)
    def layer_def(self, meta, c):
        name, params, rets, body = c
        return ast.LayerDef(self._span(meta), _check_identifier(name, self.file), _tok_span(name, self.file),
                            tuple(params or ()), rets, body)

    @v_args(meta=True)
    def attention_def(self, meta, c):
        name, params, ret, body = c
        return ast.AttentionDef(self._span(meta), _check_identifier(name, self.file), _tok_span(name, self.file),
                                tuple(params or ()), ret, body)

    def params(self, c):
        return tuple(c)

    @v_args(meta=True)
    def param(self, meta, c):
        if len(c) == 4:
            kw, name, typ, default = c
        else:
            kw, (name, typ, default) = None, c
        return ast.Param(self._span(meta), _check_identifier(name, self.file), typ, default,
                         kw is not None and kw.type == "CONST_KW", kw is not None and kw.type == "STATE_KW")

    # ---- types
    @v_args(meta=True)
    def tensor_type(self, meta, c):
        dtype, dims = c
        return ast.TensorTypeExpr(self._span(meta), _check_identifier(dtype, self.file), tuple(dims))

    @v_args(meta=True)
    def scalar_type(self, meta, c):
        return ast.ScalarTypeExpr(self._span(meta), _check_identifier(c[0], self.file))

    def dim_list(self, c):
        return tuple(c)

    def dim_name(self, c):
        return ast.DimName(_tok_span(c[0], self.file), _check_identifier(c[0], self.file))

    def dim_int(self, c):
        return ast.DimInt(_tok_span(c[0], self.file), int(c[0]))

    def _dim_bin(op):
        @v_args(meta=True)
        def f(self, meta, c):
            return ast.DimBin(self._span(meta), op, c[0], c[1])
        return f

    dim_add, dim_sub, dim_mul, dim_div = _dim_bin("+"), _dim_bin("-"), _dim_bin("*"), _dim_bin("/")

    def ret_types(self, c):
        return tuple(c)

    # ---- statements
    def block(self, c):
        return tuple(c)

    attn_block = block

    @v_args(meta=True)
    def assign(self, meta, c):
        *targets, value = c
        return ast.Assign(self._span(meta), tuple(self._name(t) for t in targets), value)

    @v_args(meta=True)
    def return_stmt(self, meta, c):
        return ast.Return(self._span(meta), tuple(c))

    @v_args(meta=True)
    def attn_call(self, meta, c):
        name, args = c
        pos, kws = self._split_args(args)
        return ast.AttnCall(self._span(meta), _check_identifier(name, self.file), pos, kws)

    # ---- expressions
    def name(self, c):
        return self._name(c[0])

    def int_lit(self, c):
        return ast.IntLit(_tok_span(c[0], self.file), int(c[0]))

    def float_lit(self, c):
        return ast.FloatLit(_tok_span(c[0], self.file), float(c[0]))

    @v_args(meta=True)
    def true_lit(self, meta, c):
        return ast.BoolLit(self._span(meta), True)

    @v_args(meta=True)
    def false_lit(self, meta, c):
        return ast.BoolLit(self._span(meta), False)

    @v_args(meta=True)
    def list_lit(self, meta, c):
        return ast.ListLit(self._span(meta), tuple(x for x in c if x is not None))

    def _bin(op):
        @v_args(meta=True)
        def f(self, meta, c):
            return ast.BinOp(self._span(meta), op, c[0], c[-1])
        return f

    add, sub, mul, div, floordiv = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("//")
    mod, matmul, pow, and_, or_ = _bin("%"), _bin("@"), _bin("**"), _bin("and"), _bin("or")

    @v_args(meta=True)
    def compare(self, meta, c):
        return ast.BinOp(self._span(meta), str(c[1]), c[0], c[2])

    @v_args(meta=True)
    def neg(self, meta, c):
        return ast.UnaryOp(self._span(meta), "-", c[0])

    @v_args(meta=True)
    def not_(self, meta, c):
        return ast.UnaryOp(self._span(meta), "not", c[0])

    @v_args(meta=True)
    def ifexp(self, meta, c):
        then, cond, other = c
        return ast.IfExp(self._span(meta), cond, then, other)

    def args(self, c):
        return tuple(c)

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ast.KwArg(self._span(meta), _check_identifier(c[0], self.file), c[1])

    def _split_args(self, args):
        args = args or ()
        pos = tuple(a for a in args if not isinstance(a, ast.KwArg))
        kws = tuple(a for a in args if isinstance(a, ast.KwArg))
        seen_kw = False
        for a in args:
            if isinstance(a, ast.KwArg):
                seen_kw = True
            elif seen_kw:
                raise _UserError(a.span, "positional argument follows keyword argument",
                                 "keyword arguments (`name = value`) come last; to compare, use '=='")
        return pos, kws

    @v_args(meta=True)
    def call(self, meta, c):
        func, args = c
        pos, kws = self._split_args(args)
        return ast.Call(self._span(meta), func, pos, kws)

    @v_args(meta=True)
    def index(self, meta, c):
        return ast.Index(self._span(meta), c[0], tuple(c[1:]))

    @v_args(meta=True)
    def attr(self, meta, c):
        return ast.Attr(self._span(meta), c[0], _check_identifier(c[1], self.file))


_EXPR_START = {"NAME", "INT", "FLOAT", "LPAR", "MINUS", "LSQB", "TRUE", "FALSE", "NOT", "PLUS"}


def _terminal_text(name: str) -> str:
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        pat = grammar_parser().get_terminal(name).pattern
        if pat.type == "str":
            return f"'{pat.value}'"
    except KeyError:
        pass
    return name.lower()


def _describe_expected(expected: set[str]) -> str:
    if expected and expected & _EXPR_START and len(expected - _EXPR_START) == 0:
        return "an expression"
    words = sorted({_terminal_text(e) for e in expected})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _syntax_diagnostic(err: UnexpectedInput, file: str, text: str) -> Diagnostic:
    line, col = max(err.line, 1), max(err.column, 1)
    if isinstance(err, UnexpectedCharacters):
        ch = text[err.pos_in_stream] if err.pos_in_stream < len(text) else "?"
        msg = "strings are not part of the language" if ch in "\"'" else f"unexpected character {ch!r}"
        return Diagnostic(Span(file, line, col, line, col + 1), msg)
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        lines = text.rstrip().splitlines() or [""]
        last = len(lines)
        span = Span(file, last, len(lines[-1]) + 1, last, len(lines[-1]) + 2)
        exp = _describe_expected(set(getattr(err, "expected", ()) or ()))
        return Diagnostic(span, "unexpected end of file" + (f"; expected {exp}" if exp else ""),
                          "is a '}' or ')' missing?")
    tok = err.token
    span = _tok_span(tok, file)
    expected = set(err.expected or ())
    val = str(tok)
    hint = None
    arrow = any(_terminal_text(e) == "'->'" for e in expected)
    if val == "=" and "EQUAL" not in expected:
        msg = "unexpected '='; assignments are statements of their own (`name = expr`), use '==' to compare"
    elif arrow:
        msg = f"unexpected {_show(tok)}; a definition needs a return type after its parameters: `-> T[N, H]`"
    elif expected & _EXPR_START and not (expected - _EXPR_START - {"RPAR", "RSQB"}):
        msg = f"unexpected {_show(tok)}; expected an expression"
    elif tok.type == "RETURN" and "RBRACE" in expected:  # only attention blocks lack `return`
        msg = "attention blocks do not return: the output is softmax(score) @ v"
        hint = "set `score = ...` and `mask = ...` instead"
    elif tok.type != "NAME" and _IDENTIFIER.fullmatch(val) and "NAME" in expected and "RBRACE" not in expected:
        msg = f"'{val}' is a reserved word and cannot be used as a name"
    else:
        msg = f"unexpected {_show(tok)}; expected {_describe_expected(expected)}"
        if val in ("{", "}"):
            hint = "is a ')' or ']' missing before it?"
    return Diagnostic(span, msg, hint)


def _show(tok: Token) -> str:
    return f"name '{tok}'" if tok.type == "NAME" else f"'{tok}'"


def _blank(text: str, start: int, end: int) -> str:
    """Replace text[start:end] by spaces, keeping newlines so positions stay valid."""
    return text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]


def _check_nesting(tree: lark.Tree, file: str) -> None:
    """Reject absurdly deep expressions with a diagnostic instead of a RecursionError."""
    stack = [(tree, 1, tree.meta)]
    while stack:
        node, depth, meta = stack.pop()
        meta = meta if getattr(node.meta, "empty", True) else node.meta
        if depth > MAX_NESTING:
            raise _UserError(Span(file, meta.line, meta.column, meta.end_line, meta.end_column),
                             f"expression is nested too deeply (more than {MAX_NESTING} levels)",
                             "split it into several statements")
        stack.extend((c, depth + 1, meta) for c in node.children if isinstance(c, lark.Tree))


def _parse_once(text: str, file: str) -> ast.Program:
    tree = grammar_parser().parse(text)
    _check_nesting(tree, file)
    try:
        return _ToAst(file).transform(tree)
    except VisitError as e:  # a user error raised while building the AST
        if isinstance(e.orig_exc, _UserError):
            raise e.orig_exc
        raise


def parse(text: str, file: str = "<string>") -> ast.Program:
    """Parse a whole file. Raises DSLError listing every syntax error found."""
    source = SourceFile(file, text)
    try:
        return _parse_once(text, file)
    except (UnexpectedInput, _UserError):
        pass
    # Recovery: parse each top-level item on its own (others blanked, positions kept).
    sink = DiagnosticSink()
    starts = [m.start() for m in _TOP_LEVEL.finditer(text)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    bounds = list(zip(starts, starts[1:] + [len(text)]))
    items: list = []
    for lo, hi in bounds:
        piece = _blank(_blank(text, 0, lo), hi, len(text))
        try:
            items.extend(_parse_once(piece, file).items)
        except UnexpectedInput as e:
            sink.error(*_unpack(_syntax_diagnostic(e, file, piece)))
        except _UserError as e:
            sink.error(e.span, e.message, e.hint)
    if not sink:  # the split parse passed where the whole failed: report the whole's error
        try:
            _parse_once(text, file)
        except UnexpectedInput as e:
            sink.error(*_unpack(_syntax_diagnostic(e, file, text)))
        except _UserError as e:
            sink.error(e.span, e.message, e.hint)
    sink.raise_if_any({file: source})
    return ast.Program(Span(file, 1, 1, 1, 1), tuple(items))


def _unpack(d: Diagnostic):
    return d.span, d.message, d.hint


__all__ = ["parse", "grammar_parser", "DSLError"]
_ = lark  # imported for its version in error reports
