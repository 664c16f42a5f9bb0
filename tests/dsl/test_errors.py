"""Every user mistake is one `file:line:col: error: message`, the source line and a caret.

Each test writes one mistake and pins where it is reported (line, column), what is said
(a substring of the message, sometimes the hint) and that the formatted error shows the
offending line with a caret under that column. Sources start at line 1 (no leading newline).
"""
from __future__ import annotations

import textwrap

import pytest
import torch

import layerforge
from layerforge import DSLError

FILE = "m.lf"


def src(text: str) -> str:
    return textwrap.dedent(text)


def load_error(text: str, *, with_stdlib: bool = False) -> DSLError:
    with pytest.raises(DSLError) as info:
        layerforge.loads(text, FILE, with_stdlib=with_stdlib)
    return info.value


def specialise_error(text: str, name: str, *, with_stdlib: bool = False, **bindings) -> DSLError:
    prog = layerforge.loads(text, FILE, with_stdlib=with_stdlib)  # the generic check passes
    with pytest.raises(DSLError) as info:
        prog.specialise(name, **bindings)
    return info.value


def expect(err: DSLError, line: int, col: int, message: str, *, hint: str | None = None, nth: int = 0,
           count: int | None = 1, file: str = FILE):
    """Diagnostic `nth` is at file:line:col, says `message`, and is shown with a caret."""
    if count is not None:
        assert len(err.diagnostics) == count, str(err)
    d = err.diagnostics[nth]
    assert (d.span.file, d.span.line, d.span.col) == (file, line, col), str(err)
    assert message in d.message, str(err)
    if hint is not None:
        assert d.hint is not None and hint in d.hint, str(err)
    text = str(err)
    assert f"{file}:{line}:{col}: error: {d.message}" in text
    source_line = err.sources[file].line_text(line)
    assert f"\n    {source_line}\n    {' ' * (col - 1)}^" in text, text
    return d


# ---- syntax ----------------------------------------------------------------------------

def test_missing_operand_before_next_statement():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            y = x *
            return y
        }
        """))
    expect(err, 5, 5, "unexpected 'return'; expected an expression")


def test_missing_operand_before_closing_brace():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x +
        }
        """))
    expect(err, 5, 1, "unexpected '}'; expected an expression")


def test_missing_return_type():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) {
            return x
        }
        """))
    expect(err, 3, 23, "a definition needs a return type after its parameters")


def test_missing_closing_brace_points_past_the_last_line():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x
        """))
    expect(err, 4, 13, "unexpected end of file", hint="is a '}' or ')' missing?")


def test_missing_closing_parenthesis():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            y = (x + 1.0
            return y
        }
        """))
    expect(err, 5, 5, "unexpected 'return'; expected ')'")


def test_stray_character():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x $ 2.0
        }
        """))
    expect(err, 4, 14, "unexpected character '$'")


def test_string_literal():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return softmax(x, axis="last")
        }
        """))
    expect(err, 4, 28, "strings are not part of the language")


def test_single_equals_used_as_comparison():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H], const c: bool = true) -> f32[N, H] {
            return x if c = true else -x
        }
        """))
    expect(err, 4, 19, "use '==' to compare")


def test_single_equals_inside_call_reads_as_keyword_argument():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return where(x = 0.0, x, -x)
        }
        """))
    expect(err, 4, 27, "positional argument follows keyword argument", hint="to compare, use '=='")


def test_reserved_word_as_parameter_name():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(dims: f32[N, H]) -> f32[N, H] {
            return dims
        }
        """))
    expect(err, 3, 9, "'dims' is a reserved word and cannot be used as a name")


def test_return_inside_attention_block_is_a_syntax_error():
    err = load_error(src("""\
        dims Hq, Hkv, D
        dynamic B, S, Skv
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            mask = q_pos >= kv_pos
            return score
        }
        """))
    expect(err, 5, 5, "attention blocks do not return", hint="set `score = ...`")


def test_absurdly_deep_expression_is_a_diagnostic_not_a_recursion_error():
    deep = "exp(" * 150 + "x" + ")" * 150
    err = load_error(f"dims H\ndynamic N\nlayer f(x: f32[N, H]) -> f32[N, H] {{\n    return {deep}\n}}\n")
    d = expect(err, 4, err.diagnostics[0].span.col, "expression is nested too deeply")
    assert 12 <= d.span.col <= 12 + len(deep)


# ---- names and calls -----------------------------------------------------------------

def test_unknown_name_suggests_a_close_one():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(hidden: f32[N, H]) -> f32[N, H] {
            y = exp(hiden)
            return y
        }
        """))
    expect(err, 4, 13, "unknown name 'hiden'", hint="did you mean 'hidden'?")


def test_unknown_function_suggests_a_builtin():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return sigmod(x)
        }
        """))
    expect(err, 4, 12, "unknown function 'sigmod'", hint="did you mean 'sigmoid'?")


def test_too_many_arguments_points_at_the_first_extra_one():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return exp(x, x)
        }
        """))
    expect(err, 4, 19, "exp() takes 1 positional argument but 2 were given")


def test_missing_argument():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return where(x > 0.0, x)
        }
        """))
    expect(err, 4, 12, "where() missing required argument 'b'")


def test_wrong_argument_count_for_a_layer():
    err = load_error(src("""\
        dims H
        dynamic N
        layer g(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        layer f(x: f32[N, H]) -> f32[N, H] {
            return g(x, x)
        }
        """))
    expect(err, 7, 17, "g() takes 1 positional argument but 2 were given")


def test_unexpected_keyword_argument():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return softmax(x, dim=-1)
        }
        """))
    expect(err, 4, 23, "softmax() got an unexpected keyword argument 'dim'")


def test_function_used_as_a_value():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x * exp
        }
        """))
    expect(err, 4, 16, "'exp' is a function; call it")


def test_attention_variable_outside_attention():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x * f32(q_pos)
        }
        """))
    expect(err, 4, 20, "'q_pos' is only defined inside an attention block")


def test_assigning_to_a_dim():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            H = x
            return x
        }
        """))
    expect(err, 4, 5, "cannot assign to 'H': it names a dim")


# ---- types and shapes ----------------------------------------------------------------

def test_shapes_that_do_not_broadcast():
    err = load_error(src("""\
        dims H, F
        dynamic N
        layer f(x: f32[N, H], y: f32[N, F]) -> f32[N, H] {
            return x + y
        }
        """))
    expect(err, 4, 12, "operator '+': shapes [N, H] and [N, F] do not broadcast")


def test_dtype_mismatch_bf16_and_f32():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: bf16[N, H], w: f32[H]) -> f32[N, H] {
            return x * w
        }
        """))
    expect(err, 4, 12, "operator '*': dtype mismatch between bf16 and f32", hint="cast one side explicitly")


def test_integer_tensor_with_float_scalar():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(i: i32[N, H]) -> i32[N, H] {
            return i * 0.5
        }
        """))
    expect(err, 4, 12, "cannot combine an i32 tensor with a float scalar")


def test_axis_out_of_range():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, 1] {
            return sum(x, axis=2)
        }
        """))
    expect(err, 4, 12, "axis 2 is out of range for a tensor of rank 2 [N, H]")


def test_matmul_inner_dims_differ():
    err = load_error(src("""\
        dims I, O
        dynamic N
        layer f(x: f32[N, I], w: f32[O, I]) -> f32[N, O] {
            return x @ w
        }
        """))
    expect(err, 4, 12, "'@': inner dims differ: [N, I] @ [O, I]", hint="transpose one side with .T?")


def test_where_condition_must_be_bool():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return where(x, x, -x)
        }
        """))
    expect(err, 4, 18, "where() condition must be bool, got f32")


def test_unknown_dtype():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: bf61[N, H]) -> f32[N, H] {
            return f32(x)
        }
        """))
    expect(err, 3, 12, "unknown dtype 'bf61'", hint="did you mean 'bf16'?")


def test_unknown_dim_in_a_type():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, HH]) -> f32[N, H] {
            return x
        }
        """))
    expect(err, 3, 19, "unknown dim 'HH'", hint="did you mean 'H'?")


def test_dim_expression_that_does_not_divide():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, 3 / 2]) -> f32[N, 3 / 2] {
            return x
        }
        """))
    expect(err, 3, 19, "dim 3 / 2 does not divide evenly", nth=0, count=2)


def test_unknown_attribute():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[H, N] {
            return x.t
        }
        """))
    expect(err, 4, 12, "unknown attribute '.t'")


# ---- returns ---------------------------------------------------------------------------

def test_layer_that_never_returns():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            y = exp(x)
        }
        """))
    expect(err, 3, 7, "layer 'f' never returns a value", hint="end the body with `return ...`")


def test_statement_after_return():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x
            y = x
        }
        """))
    expect(err, 5, 5, "unreachable statement after 'return'")


def test_wrong_number_of_returned_values():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> (f32[N, H], f32[N, H]) {
            return x
        }
        """))
    expect(err, 4, 5, "'f' returns 1 value but its signature declares 2")


def test_returned_shape_differs_from_signature():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return sum(x, axis=-1)
        }
        """))
    expect(err, 4, 12, "returned value has shape [N, 1] but the signature declares [N, H]")


def test_returned_dtype_differs_from_signature():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> bf16[N, H] {
            return x
        }
        """))
    expect(err, 4, 12, "returned value has dtype f32 but the signature declares bf16", hint="cast it: bf16(...)")


def test_second_returned_value_is_reported_at_its_own_column():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> (f32[N, H], f32[N, H]) {
            return x, mean(x)
        }
        """))
    expect(err, 4, 15, "returned value has shape [N, 1]")


# ---- definitions and unpacking ------------------------------------------------------------

def test_duplicate_layer_definition():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        layer f(x: f32[N, H]) -> f32[N, H] {
            return -x
        }
        """))
    expect(err, 6, 7, "'f' is already defined at line 3")


def test_duplicate_parameter():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H], x: f32[N, H]) -> f32[N, H] {
            return x
        }
        """))
    expect(err, 3, 23, "parameter 'x' is declared twice")


def test_duplicate_dim():
    err = load_error(src("""\
        dims H, F, H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        """))
    expect(err, 1, 12, "dim 'H' is declared twice")


def test_redefining_a_builtin():
    err = load_error(src("""\
        dims H
        dynamic N
        layer softmax(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        """))
    expect(err, 3, 7, "'softmax' is a builtin and cannot be redefined")


def test_unpacking_one_value_into_two_names():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            a, b = exp(x)
            return a
        }
        """))
    expect(err, 4, 5, "cannot unpack one value into 2 names")


def test_unpacking_two_values_into_three_names():
    err = load_error(src("""\
        dims F
        dynamic N
        layer f(x: f32[N, 2*F]) -> f32[N, F] {
            a, b, c = split(x, 2)
            return a
        }
        """))
    expect(err, 4, 5, "expression gives 2 values but 3 names are assigned")


def test_several_values_assigned_to_one_name():
    err = load_error(src("""\
        dims F
        dynamic N
        layer f(x: f32[N, 2*F]) -> f32[N, F] {
            a = split(x, 2)
            return a
        }
        """))
    expect(err, 4, 5, "expression gives 2 values; unpack them")


# ---- recursion ---------------------------------------------------------------------------

def test_layer_calling_itself():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return f(x)
        }
        """))
    expect(err, 4, 12, "recursive call: f -> f", hint="layers cannot call themselves")


def test_mutual_recursion_is_reported_at_both_calls():
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return g(x)
        }
        layer g(x: f32[N, H]) -> f32[N, H] {
            return f(x) * 2.0
        }
        """))
    expect(err, 4, 12, "recursive call: g -> f -> g", nth=0, count=2)
    expect(err, 7, 12, "recursive call: f -> g -> f", nth=1, count=2)


# ---- attention ----------------------------------------------------------------------------

ATTN_DIMS = "dims Hq, Hkv, D\ndynamic B, S, Skv\n"


def test_mask_that_is_not_bool():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            mask = q_pos - kv_pos
        }
        """))
    expect(err, 4, 12, "mask must be a bool expression, got i32", hint="mask = q_pos >= kv_pos")


def test_attention_without_q_k_v():
    err = load_error(ATTN_DIMS + src("""\
        attention a(x: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            mask = q_pos >= kv_pos
        }
        """))
    expect(err, 3, 11, "attention 'a' must take q, k, v as its first three parameters")


def test_indexing_in_layers_is_a_row_lookup():
    # layers index tensor parameters with integer tensors (w[ids]); a full index gives a scalar
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H], i: i32[N]) -> f32[N, H] {
            return x[0, 1]
        }
        """))
    expect(err, 4, 12, "returned value has shape [] but the signature declares [N, H]")
    err = load_error(src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H], i: i32[N]) -> f32[N, H] {
            return (x + 1.0)[i]
        }
        """))
    expect(err, 4, 13, "only tensor parameters can be indexed", hint="use slice(...), split(...) or gather(...)")


def test_assigning_to_a_position_inside_attention():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            q_pos = kv_pos
        }
        """))
    expect(err, 4, 5, "'q_pos' is defined by the attention block and cannot be assigned")


def test_unknown_attention_directive():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            rotary(theta = 10000.0)
        }
        """))
    expect(err, 4, 5, "unknown attention directive 'rotary(...)'")


def test_attention_score_that_is_a_tensor():
    err = load_error(ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D],
                    bias: f32[Hq]) -> bf16[B, S, Hq, D] {
            score = score + bias
        }
        """))
    expect(err, 5, 13, "'score' must be a scalar, got f32[Hq]", hint="bias[h, kv_pos]")


# ---- specialisation: numbers make new mistakes possible ----------------------------------

def test_split_of_an_odd_width():
    text = src("""\
        dims F
        dynamic N
        layer halves(x: f32[N, F]) -> f32[N, F] {
            a, b = split(x, 2)
            return concat(b, a)
        }
        """)
    err = specialise_error(text, "halves", F=7)
    expect(err, 4, 12, "split: axis of size 7 does not divide into 2 parts")


def test_group_norm_with_groups_that_do_not_divide_the_width():
    text = src("""\
        dims H, G
        dynamic N
        layer gn(x: f32[N, H]) -> f32[N, H] {
            xg = reshape(x, N, G, H / G)
            xc = xg - mean(xg, axis=-1)
            return reshape(xc, N, H)
        }
        """)
    err = specialise_error(text, "gn", H=10, G=4)
    expect(err, 4, 27, "size 10 / 4 = 10/4 does not divide evenly")


def test_stdlib_group_norm_error_points_into_the_stdlib_source():
    err = specialise_error("", "group_norm", with_stdlib=True, H=10, G=4, dtype="f32")
    d = err.diagnostics[0]
    assert d.span.file == "<stdlib>/norms.lf"
    assert "does not divide evenly" in d.message
    line = err.sources[d.span.file].line_text(d.span.line)
    assert "reshape(f32(x), N, G, H / G)" in line
    assert line[d.span.col - 1:].startswith("H / G")


def test_gqa_query_heads_not_a_multiple_of_kv_heads():
    text = ATTN_DIMS + src("""\
        attention a(q: bf16[B, S, Hq, D], k: bf16[B, Skv, Hkv, D], v: bf16[B, Skv, Hkv, D]) -> bf16[B, S, Hq, D] {
            mask = q_pos >= kv_pos
        }
        """)
    err = specialise_error(text, "a", Hq=6, Hkv=4, D=8)
    expect(err, 3, 35, "6 query heads cannot be grouped over 4 KV heads", hint="GQA needs Hq to be a multiple of Hkv")


def test_unbound_dim_is_reported_at_each_use():
    text = src("""\
        dims H, F
        dynamic N
        layer f(x: f32[N, H], w: f32[F, H]) -> f32[N, F] {
            return x @ w.T
        }
        """)
    err = specialise_error(text, "f", H=8)
    expect(err, 3, 30, "dim 'F' is unbound", hint="pass F=...", nth=0, count=2)
    expect(err, 3, 47, "dim 'F' is unbound", nth=1, count=2)


def test_dim_bound_to_a_non_positive_number():
    text = src("""\
        dims H
        dynamic N
        layer f(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        """)
    err = specialise_error(text, "f", H=0)
    expect(err, 1, 6, "dim 'H' must be bound to a positive integer, got 0")


def test_const_parameter_without_a_value():
    text = src("""\
        dims H
        dynamic N
        layer scaled(x: f32[N, H], const c: f32) -> f32[N, H] {
            return x * c
        }
        """)
    err = specialise_error(text, "scaled", H=4)
    expect(err, 3, 28, "const parameter 'c' has no default and was not given", hint="pass c=...")
    assert layerforge.loads(text, FILE, with_stdlib=False).specialise("scaled", H=4, c=2.0).function


def test_const_bool_without_default_can_choose_a_branch_once_bound():
    text = src("""\
        dims H
        dynamic N
        layer pick(x: f32[N, H], const neg: bool) -> f32[N, H] {
            return -x if neg else x
        }
        """)
    prog = layerforge.loads(text, FILE, with_stdlib=False)
    x = torch.randn(2, 4)
    (y,) = layerforge.evaluate(prog.specialise("pick", H=4, neg=True).function, {"x": x})
    assert torch.equal(y, -x)
    (y,) = layerforge.evaluate(prog.specialise("pick", H=4, neg=False).function, {"x": x})
    assert torch.equal(y, x)


def test_const_condition_branches_must_agree_before_binding():
    err = load_error(src("""\
        dims H
        dynamic N
        layer pick(x: f32[N, H], const neg: bool) -> f32[N, H] {
            return sum(x) if neg else x
        }
        """))
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (4, 12)
    assert "the branches of 'a if c else b' differ: f32[N, 1] and f32[N, H]" in d.message


def test_topk_larger_than_the_axis_after_specialisation():
    err = specialise_error("", "moe_route", with_stdlib=True, E=4, k=8, dtype="f32")
    d = err.diagnostics[0]
    assert d.span.file == "<stdlib>/rows.lf" and "k = 8 is larger than the axis it selects from (4)" in d.message
    assert "topk(p, k)" in err.sources[d.span.file].line_text(d.span.line)


# ---- several errors, and errors inside called layers -----------------------------------------

def test_every_checker_error_in_a_file_is_reported_in_source_order():
    err = load_error(src("""\
        dims H
        dynamic N
        layer c(x: f32[N, H]) -> f32[N, 1] {
            return sum(x, axis=5)
        }
        layer a(x: f32[N, H]) -> f32[N, H] {
            return expp(x)
        }
        layer b(x: f32[N, H]) -> f32[N, H] {
            y = x + zz
            return y
        }
        layer ok(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        """))
    assert [(d.span.line, d.span.col) for d in err.diagnostics] == [(4, 12), (7, 12), (10, 13)]
    assert "axis 5 is out of range" in err.diagnostics[0].message
    assert "unknown function 'expp'" in err.diagnostics[1].message
    assert "unknown name 'zz'" in err.diagnostics[2].message
    assert str(err).endswith("3 errors")


def test_every_syntax_error_in_a_file_is_reported():
    err = load_error(src("""\
        dims H
        dynamic N
        layer a(x: f32[N, H]) -> f32[N, H] {
            return x +
        }
        layer b(x: f32[N, H]) f32[N, H] {
            return x
        }
        layer c(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        layer d(x: f32[N, H]) -> f32[N, H] {
            return x $ x
        }
        """))
    expect(err, 5, 1, "expected an expression", nth=0, count=3)
    expect(err, 6, 23, "needs a return type", nth=1, count=3)
    expect(err, 13, 14, "unexpected character '$'", nth=2, count=3)


def test_error_inside_a_called_layer_is_reported_once_in_the_callee():
    err = load_error(src("""\
        dims H
        dynamic N
        layer inner(x: f32[N, H]) -> f32[N, H] {
            return x * true
        }
        layer outer(x: f32[N, H]) -> f32[N, H] {
            return inner(x) + inner(-x)
        }
        """))
    expect(err, 4, 12, "operator '*' does not take bool operands")


def test_argument_of_the_wrong_dtype_is_reported_at_the_call():
    err = load_error(src("""\
        dims H
        dynamic N
        layer inner(x: f32[N, H]) -> f32[N, H] {
            return x
        }
        layer outer(x: bf16[N, H]) -> f32[N, H] {
            return inner(x)
        }
        """))
    expect(err, 7, 18, "argument 'x' of inner() must be f32, got bf16")


def test_argument_dims_that_disagree_are_reported_at_the_argument():
    err = load_error(src("""\
        dims H, F
        dynamic N
        layer inner(x: f32[N, H], w: f32[H]) -> f32[N, H] {
            return x * w
        }
        layer outer(x: f32[N, H], w: f32[F]) -> f32[N, H] {
            return inner(x, w)
        }
        """))
    expect(err, 7, 21, "argument 'w' of inner(): dim H does not match F")


def test_calling_a_stdlib_layer_wrongly_is_reported_in_the_user_file():
    err = load_error(src("""\
        layer my_norm(x: bf16[N, H], w: bf16[F]) -> bf16[N, H] {
            return rms_norm(x, w)
        }
        """), with_stdlib=True)
    expect(err, 2, 24, "argument 'w' of rms_norm(): dim H does not match F")


# ---- identifiers can never inject into generated C++ ------------------------------------------

@pytest.mark.parametrize("text, line, col", [
    ("dims H\ndynamic N\nlayer __f(x: f32[N, H]) -> f32[N, H] {\n    return x\n}\n", 3, 7),
    ("dims H\ndynamic N\nlayer f(__x: f32[N, H]) -> f32[N, H] {\n    return __x\n}\n", 3, 9),
    ("dims H\ndynamic N\nlayer f(x: f32[N, H]) -> f32[N, H] {\n    __y = x\n    return __y\n}\n", 4, 5),
    ("dims __H\ndynamic N\nlayer f(x: f32[N, 4]) -> f32[N, 4] {\n    return x\n}\n", 1, 6),
    ("dims H\ndynamic N\nlayer f(x: f32[N, H]) -> f32[N, H] {\n    return softmax(x, __axis=1)\n}\n", 4, 23),
], ids=["layer", "parameter", "local", "dim", "keyword"])
def test_double_underscore_identifiers_are_reserved(text, line, col):
    err = load_error(text)
    expect(err, line, col, "may not start with '__' (reserved)")


@pytest.mark.parametrize("char", ["é", "λ", "ｘ", "\u200b", "\u202e", "\x00", ";", "`", "\\", "$", "?", "&", "|",
                                  "~", "^", "!"])
def test_non_ascii_and_punctuation_cannot_lex_inside_a_name(char):
    err = load_error(f"dims H\ndynamic N\nlayer f(x: f32[N, H]) -> f32[N, H] {{\n    y{char}z = x\n    return x\n}}\n")
    d = err.diagnostics[0]
    assert (d.span.line, d.span.col) == (4, 6)
    assert d.message == f"unexpected character {char!r}"


def test_overlong_identifier_is_rejected():
    name = "a" * 65
    err = load_error(f"dims H\ndynamic N\nlayer {name}(x: f32[N, H]) -> f32[N, H] {{\n    return x\n}}\n")
    expect(err, 3, 7, "identifier is longer than 64 characters")


# ---- file-level errors --------------------------------------------------------------------------

def test_unreadable_file_names_the_file_without_a_fake_position(tmp_path):
    missing = tmp_path / "missing.lf"
    with pytest.raises(DSLError) as info:
        layerforge.load(missing)
    assert str(info.value) == f"{missing}: error: cannot read file: No such file or directory"


def test_non_utf8_file(tmp_path):
    f = tmp_path / "bin.lf"
    f.write_bytes(b"dims H\n\xff\xfe\n")
    with pytest.raises(DSLError) as info:
        layerforge.load(f)
    assert str(info.value).startswith(f"{f}: error: file is not UTF-8 text")
