"""`layerforge check` and `layerforge list` do not import torch (seconds of start-up): the
package, the DSL front end and the CLI load it only where a tensor is made; the reference
evaluator and the runtime stay reachable through lazy attributes."""
import subprocess
import sys
import textwrap

import pytest

CHECK = textwrap.dedent("""
    import sys, io, contextlib
    import layerforge.cli
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert layerforge.cli.main({argv!r}) == 0
    heavy = [m for m in ("torch", "sympy.physics", "layerforge.dsl.evaluator", "layerforge.runtime.layers")
             if m in sys.modules]
    assert not heavy, heavy
    print(out.getvalue().splitlines()[0])
""")


def run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("argv", [["check"], ["list"]])
def test_check_and_list_do_not_import_torch(argv):
    assert run(CHECK.format(argv=argv))


def test_check_of_a_file_does_not_import_torch(tmp_path):
    f = tmp_path / "mine.lf"
    f.write_text("layer double(x: T[N, H]) -> T[N, H] {\n    return x + x\n}\n")
    assert "ok (1 definition: double)" in run(CHECK.format(argv=["check", str(f)]))


def test_lazy_names_still_work():
    out = run(textwrap.dedent("""
        import sys, layerforge as lf
        assert "torch" not in sys.modules
        p = lf.stdlib()
        layer = p.specialise("rms_norm", H=8, dtype="f32")
        import torch
        (y,) = lf.evaluate(layer.function, {"x": torch.ones(2, 8), "w": torch.ones(8)})
        assert y.shape == (2, 8)
        from layerforge import LayerInputError, evaluate, Embedding
        assert issubclass(LayerInputError, ValueError)
        from layerforge.dsl.types import DType
        assert DType.bf16.torch is torch.bfloat16
        from layerforge.dsl import numerics
        assert numerics.F64 is torch.float64
        print("ok")
    """))
    assert out.strip() == "ok"
