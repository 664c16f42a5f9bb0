"""A user definition that shadows a standard-library name: the stdlib's own callers keep the
definition they were written against, and every error is reported in the user's file."""
import pytest

import layerforge as lf

FILE = "my_layers.lf"


def test_shadowing_with_another_signature_breaks_no_stdlib_caller():
    prog = lf.loads("layer rms_norm(x: T[N, H]) -> T[N, H] {\n    return x\n}\n", FILE)
    assert prog.definition("rms_norm").span.file == FILE
    assert [p.name for p in prog.specialise("rms_norm", H=8, dtype="f32").function.params] == ["x"]
    # add_rms_norm (stdlib) still calls the stdlib's rms_norm(x, w, eps)
    fn = prog.specialise("add_rms_norm", H=8, dtype="f32").function
    assert [p.name for p in fn.params] == ["x", "res", "w", "eps"]


def test_errors_in_a_shadowing_definition_point_at_the_users_file():
    text = "layer rms_norm(x: T[N, H], w: T[H]) -> T[N, H] {\n    return x * rsqtr(w)\n}\n"
    with pytest.raises(lf.DSLError) as e:
        lf.loads(text, FILE)
    files = {d.span.file for d in e.value.diagnostics}
    assert files == {FILE}, e.value.format()
    assert len(e.value.diagnostics) == 1 and "rsqtr" in e.value.diagnostics[0].message


def test_user_calls_resolve_to_the_users_definition():
    text = ("layer rms_norm(x: T[N, H]) -> T[N, H] {\n    return x + x\n}\n"
            "layer twice(x: T[N, H]) -> T[N, H] {\n    return rms_norm(x)\n}\n")
    prog = lf.loads(text, FILE)
    assert [p.name for p in prog.specialise("twice", H=8, dtype="f32").function.params] == ["x"]
