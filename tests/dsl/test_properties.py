"""Properties of the front end, checked on generated input.

(a) Random well-formed programs (elementwise math, keepdim reductions, softmax, where with
    comparisons, over tensors T[N, H], T[N, 1], T[H] and a scalar) parse, check, specialise
    and evaluate; the output has the declared shape and dtype, and in float64 it equals an
    independent torch rendering of the same expression tree.
(b) Any text at all (random characters, random bytes, mutated standard-library sources,
    absurd nesting) either loads or raises DSLError, never anything else, and every
    diagnostic is formatted as `file:line:col: error: ...`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerforge
from layerforge import DSLError
from layerforge.dsl import ast
from layerforge.dsl.parser import parse
from layerforge.dsl.program import stdlib_sources

FILE = "m.lf"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---- (a) generated well-formed programs ----------------------------------------------------------

Shape = tuple  # of "N", "H", "1": a symbolic shape in the generated program


def broadcast(a: Shape, b: Shape) -> Shape:
    n = max(len(a), len(b))
    a, b = ("1",) * (n - len(a)) + a, ("1",) * (n - len(b)) + b
    return tuple(x if y == "1" else y for x, y in zip(a, b))


@dataclass(frozen=True)
class Gen:
    """A generated expression: its DSL text, its shape and its meaning as a torch function."""

    text: str
    shape: Shape
    fn: Callable[[dict], torch.Tensor]


LEAVES = [Gen("x", ("N", "H"), lambda env: env["x"]),
          Gen("y", ("N", "H"), lambda env: env["y"]),
          Gen("r", ("N", "1"), lambda env: env["r"]),
          Gen("w", ("H",), lambda env: env["w"]),
          Gen("s", (), lambda env: env["s"]),
          Gen("c", (), lambda env: env["c"])]

# Literals exact in every float dtype, so the float64 comparison is exact too.
LITERALS = ["0.5", "2.0", "1.5", "0.25", "3"]

UNARY = {
    "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu,
    "relu": torch.relu, "abs": torch.abs,
}
BINARY = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}
COMPARE = {"<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge, "==": torch.eq, "!=": torch.ne}
REDUCE = {
    "sum": lambda v: v.sum(-1, keepdim=True), "mean": lambda v: v.mean(-1, keepdim=True),
    "max": lambda v: v.amax(-1, keepdim=True), "min": lambda v: v.amin(-1, keepdim=True),
}
REDUCE_SPELLING = ["{f}({a})", "{f}({a}, axis=-1)", "{f}({a}, keepdim=true)", "{f}({a}, axis=-1, keepdim=true)"]


def literal(text: str) -> Gen:
    return Gen(text, (), lambda env, v=float(text): torch.tensor(v, dtype=torch.float64))


@st.composite
def operand(draw, depth: int) -> Gen:
    """Either a sub-expression or (sometimes) a literal: never a constant-only subtree,
    which the checker would fold (and rightly reject when it is 1 / 0)."""
    if draw(st.integers(0, 3)) == 0:
        return literal(draw(st.sampled_from(LITERALS)))
    return draw(expr(depth))


@st.composite
def condition(draw, depth: int) -> tuple[str, Shape, Callable]:
    a = draw(expr(depth))
    b = draw(operand(depth))
    if draw(st.booleans()):
        a, b = b, a
    op = draw(st.sampled_from(sorted(COMPARE)))
    text, shape = f"{a.text} {op} {b.text}", broadcast(a.shape, b.shape)
    fn = lambda env, a=a, b=b, f=COMPARE[op]: f(a.fn(env), b.fn(env))  # noqa: E731
    kind = draw(st.sampled_from(["plain", "not", "and", "or"]))
    if kind == "not":
        return f"not ({text})", shape, lambda env, g=fn: torch.logical_not(g(env))
    if kind in ("and", "or"):
        other = draw(expr(0))
        o = draw(st.sampled_from(sorted(COMPARE)))
        text2 = f"{other.text} {o} 0.5"
        fn2 = lambda env, g=other.fn, f=COMPARE[o]: f(g(env), torch.tensor(0.5, dtype=torch.float64))  # noqa: E731
        combine = torch.logical_and if kind == "and" else torch.logical_or
        return (f"({text}) {kind} ({text2})", broadcast(shape, other.shape),
                lambda env, g=fn, h=fn2, f=combine: f(g(env), h(env)))
    return text, shape, fn


@st.composite
def expr(draw, depth: int) -> Gen:
    if depth <= 0:
        return draw(st.sampled_from(LEAVES))
    kind = draw(st.sampled_from(["leaf", "unary", "neg", "binary", "square", "maxmin", "reduce", "softmax",
                                 "where"]))
    sub = depth - 1
    if kind == "leaf":
        return draw(st.sampled_from(LEAVES))
    if kind == "unary":
        f = draw(st.sampled_from(sorted(UNARY)))
        a = draw(expr(sub))
        return Gen(f"{f}({a.text})", a.shape, lambda env, a=a, g=UNARY[f]: g(a.fn(env)))
    if kind == "neg":
        a = draw(expr(sub))
        return Gen(f"-({a.text})", a.shape, lambda env, a=a: -a.fn(env))
    if kind == "square":
        a = draw(expr(sub))
        return Gen(f"({a.text}) ** 2", a.shape, lambda env, a=a: a.fn(env) ** 2)
    if kind in ("binary", "maxmin"):
        a, b = draw(expr(sub)), draw(operand(sub))
        if draw(st.booleans()):
            a, b = b, a
        shape = broadcast(a.shape, b.shape)
        if kind == "binary":
            op = draw(st.sampled_from(sorted(BINARY)))
            return Gen(f"({a.text}) {op} ({b.text})", shape, lambda env, a=a, b=b, f=BINARY[op]: f(a.fn(env), b.fn(env)))
        f = draw(st.sampled_from(["max", "min", "maximum", "minimum"]))
        g = torch.maximum if f in ("max", "maximum") else torch.minimum
        return Gen(f"{f}({a.text}, {b.text})", shape, lambda env, a=a, b=b, g=g: g(a.fn(env), b.fn(env)))
    a = draw(expr(sub))
    if kind == "where":
        cond_text, cond_shape, cond = draw(condition(sub))
        b = draw(operand(sub))
        if not a.shape and not b.shape:  # where(tensor cond, scalar, scalar) would be an f32 tensor, not T
            a = Gen(f"({a.text}) + x", ("N", "H"), lambda env, a=a: a.fn(env) + env["x"])
        shape = broadcast(cond_shape, broadcast(a.shape, b.shape))
        return Gen(f"where({cond_text}, {a.text}, {b.text})", shape,
                   lambda env, c=cond, a=a, b=b: torch.where(c(env), a.fn(env), b.fn(env)))
    if not a.shape:  # reductions and softmax need a tensor
        a = Gen(f"({a.text}) + x", ("N", "H"), lambda env, a=a: a.fn(env) + env["x"])
    if kind == "softmax":
        spelling = draw(st.sampled_from(["softmax({a})", "softmax({a}, axis=-1)"]))
        return Gen(spelling.format(a=a.text), a.shape, lambda env, a=a: torch.softmax(a.fn(env), -1))
    f = draw(st.sampled_from(sorted(REDUCE)))
    spelling = draw(st.sampled_from(REDUCE_SPELLING))
    return Gen(spelling.format(f=f, a=a.text), a.shape[:-1] + ("1",), lambda env, a=a, g=REDUCE[f]: g(a.fn(env)))


def program_text(body: Gen) -> tuple[str, Shape]:
    if not body.shape:  # a layer returns tensors
        body = Gen(f"({body.text}) + x", ("N", "H"), None)
    ret = ", ".join(body.shape)
    return (f"dims H\ndynamic N\n"
            f"layer gen(x: T[N, H], y: T[N, H], r: T[N, 1], w: T[H], s: f32, const c: f32 = 0.75) -> T[{ret}] {{\n"
            f"    out = {body.text}\n"
            f"    return out\n"
            f"}}\n"), body.shape


@settings(max_examples=150, **SETTINGS)
@given(body=expr(4), dtype=st.sampled_from(["f32", "bf16", "f16"]), n=st.integers(1, 4), h=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_generated_programs_check_specialise_and_evaluate(body, dtype, n, h, seed):
    text, shape = program_text(body)
    prog = layerforge.loads(text, FILE, with_stdlib=False)
    layer = prog.specialise("gen", H=h, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    tdt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    inputs = {"x": torch.randn(n, h, generator=gen).to(tdt), "y": torch.randn(n, h, generator=gen).to(tdt),
              "r": torch.randn(n, 1, generator=gen).to(tdt), "w": torch.randn(h, generator=gen).to(tdt),
              "s": float(torch.randn((), generator=gen))}
    sizes = {"N": n, "H": h, "1": 1}
    want_shape = tuple(sizes[d] for d in shape)

    (out,) = layerforge.evaluate(layer.function, inputs)
    assert tuple(out.shape) == want_shape and out.dtype == tdt

    (exact,) = layerforge.evaluate(layer.function, inputs, precision="float64")
    env = {k: (v.to(torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64))
           for k, v in inputs.items()}
    env["c"] = torch.tensor(0.75, dtype=torch.float64)
    expected = body.fn(env) if body.shape else body.fn(env) + env["x"]
    assert tuple(exact.shape) == want_shape
    torch.testing.assert_close(exact, expected.expand(want_shape), rtol=1e-9, atol=1e-12, equal_nan=True,
                               check_dtype=False)


def test_a_generated_program_looks_like_this():
    """A fixed example of what the generator writes, so a reader can see it."""
    body = Gen("where(x > 0.5, softmax(x * w), max(y, s))", ("N", "H"), None)
    text, _ = program_text(body)
    layer = layerforge.loads(text, FILE, with_stdlib=False).specialise("gen", H=3, dtype="f32")
    x = torch.tensor([[0.0, 1.0, 2.0]])
    y = torch.tensor([[-1.0, 5.0, 0.0]])
    w = torch.ones(3)
    (out,) = layerforge.evaluate(layer.function, {"x": x, "y": y, "r": torch.zeros(1, 1), "w": w, "s": 0.25})
    sm = torch.softmax(x, -1)
    torch.testing.assert_close(out, torch.tensor([[0.25, sm[0, 1].item(), sm[0, 2].item()]]))


# ---- (b) anything else is a DSLError, formatted with a position -------------------------------------

HEAD = re.compile(r"m\.lf:[1-9][0-9]*:[1-9][0-9]*: error: ")
SAFE_IDENTIFIER = re.compile(r"(?!__)[A-Za-z_][A-Za-z0-9_]{0,63}")


def loads_or_dsl_error(text: str):
    """Load `text`; on DSLError check every diagnostic's form. Any other exception fails the test."""
    try:
        return layerforge.loads(text, FILE, with_stdlib=False)
    except DSLError as e:
        formatted = str(e)
        assert HEAD.match(formatted), formatted
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.span.file == FILE and d.span.line >= 1 and d.span.col >= 1, d
            assert HEAD.match(d.format()), d
            assert f"{d.span}: error: {d.message}" in formatted
        return None


def identifiers(node) -> list[str]:
    out = []
    for f in dataclasses.fields(node):
        v = getattr(node, f.name)
        if f.name in ("id", "name", "dtype") and isinstance(v, str):
            out.append(v)
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, ast.Node):
                out.extend(identifiers(x))
    return out


def assert_identifiers_are_safe(text: str) -> None:
    """Whatever parses names things only with short ASCII identifiers that cannot collide with
    generated C++ (no leading '__')."""
    try:
        prog = parse(text, FILE)
    except DSLError:
        return
    for name in identifiers(prog):
        assert SAFE_IDENTIFIER.fullmatch(name), name


@settings(max_examples=200, **SETTINGS)
@given(st.text(max_size=300))
def test_random_text_gives_only_dsl_errors(text):
    loads_or_dsl_error(text)
    assert_identifiers_are_safe(text)


@settings(max_examples=200, **SETTINGS)
@given(st.binary(max_size=300))
def test_random_bytes_give_only_dsl_errors(data):
    text = data.decode("latin-1")  # every byte becomes some character, control characters included
    loads_or_dsl_error(text)
    assert_identifiers_are_safe(text)


TOKENS = ["layer", "attention", "dims", "dynamic", "const", "return", "if", "else", "and", "or", "not",
          "true", "false", "T", "f32", "bf16", "i32", "bool", "N", "H", "x", "__x", "score", "mask", "q_pos",
          "softmax", "split", "topk", "where", "sum", "rope", "->", "=", "==", "**", "//", "@", ".T", "(", ")",
          "[", "]", "{", "}", ",", ":", "+", "-", "*", "/", "%", "<", ">=", "#", "\n", " ", "\t", "0", "1.5e3",
          "-1", "'", '"', "$", ";", "é", "\x00", "\r\n", "2*F", "H / G"]

STDLIB_TEXTS = [s.text for s in stdlib_sources()]
DIMS_TEXT = next(t for s, t in zip(stdlib_sources(), STDLIB_TEXTS) if s.name.endswith("00_dims.lf"))
BODY_TEXTS = [t for t in STDLIB_TEXTS if t is not DIMS_TEXT]


@st.composite
def mutated_stdlib(draw) -> str:
    text = DIMS_TEXT + draw(st.sampled_from(BODY_TEXTS))
    for _ in range(draw(st.integers(1, 5))):
        i = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "duplicate"]))
        if kind == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 8)):]
        elif kind == "insert":
            piece = draw(st.sampled_from(TOKENS) | st.characters())
            text = text[:i] + piece + text[i:]
        else:
            j = min(len(text), i + draw(st.integers(1, 40)))
            text = text[:j] + text[i:j] + text[j:]
    return text


@settings(max_examples=150, **SETTINGS)
@given(mutated_stdlib())
def test_mutated_stdlib_sources_give_only_dsl_errors(text):
    loads_or_dsl_error(text)
    assert_identifiers_are_safe(text)


@settings(max_examples=50, **SETTINGS)
@given(depth=st.integers(1, 400), kind=st.sampled_from(["paren", "neg", "not", "call", "chain", "index"]))
def test_deep_nesting_gives_a_dsl_error_or_loads(depth, kind):
    inner = {"paren": "(" * depth + "x" + ")" * depth,
             "neg": "-" * depth + "x",
             "not": "where(" + "not " * depth + "(x > 0.0), x, x)",
             "call": "exp(" * depth + "x" + ")" * depth,
             "chain": " + ".join(["x"] * depth),
             "index": "x" + "[0]" * depth}[kind]
    loads_or_dsl_error(f"dims H\ndynamic N\nlayer f(x: f32[N, H]) -> f32[N, H] {{\n    return {inner}\n}}\n")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment", "dims H", "dynamic N,"])
def test_programs_without_definitions_load(text):
    assert layerforge.loads(text, FILE, with_stdlib=False).names == []
