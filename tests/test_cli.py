"""The `layerforge` command line: `check` reports ok or file:line:col errors, never a traceback."""
from __future__ import annotations

import subprocess
import sys

import pytest

from layerforge.cli import main

GOOD = """\
dims Z
dynamic N
layer double(x: f32[N, Z]) -> f32[N, Z] {
    return x * 2.0
}
layer halve(x: f32[N, Z]) -> f32[N, Z] {
    return x / 2.0
}
"""

BAD = """\
dims Z
dynamic N
layer f(x: f32[N, Z]) -> f32[N, Z] {
    return x $ 2.0
}
"""

USES_STDLIB = """\
layer norm_then_silu(x: T[N, H], w: T[H]) -> T[N, H] {
    return T(silu(f32(rms_norm(x, w))))
}
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "good.lf").write_text(GOOD)
    (tmp_path / "bad.lf").write_text(BAD)
    (tmp_path / "uses_stdlib.lf").write_text(USES_STDLIB)
    (tmp_path / "latin1.lf").write_bytes(b"dims H\n# caf\xe9\n")
    return tmp_path


def run_module(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def assert_no_traceback(*streams: str) -> None:
    for s in streams:
        assert "Traceback" not in s


# ---- through `python -m layerforge` -----------------------------------------------------------------

def test_module_help(tmp_path):
    r = run_module("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: layerforge")
    assert "check" in r.stdout and "list" in r.stdout


def test_module_check_good_file(files):
    r = run_module("check", "good.lf", cwd=files)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "good.lf: ok (2 definitions: double, halve)\n"
    assert r.stderr == ""


def test_module_check_bad_file(files):
    r = run_module("check", "bad.lf", cwd=files)
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == ("bad.lf:4:14: error: unexpected character '$'\n"
                        "        return x $ 2.0\n"
                        "                 ^\n")


def test_module_check_without_files_checks_the_standard_library(tmp_path):
    r = run_module("check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "standard library: ok\n"


def test_module_check_nonexistent_file(tmp_path):
    r = run_module("check", "missing.lf", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == "missing.lf: error: cannot read file: No such file or directory\n"
    assert_no_traceback(r.stdout, r.stderr)


def test_module_unknown_command_is_an_argparse_error(tmp_path):
    r = run_module("frobnicate", cwd=tmp_path)
    assert r.returncode == 2
    assert "invalid choice: 'frobnicate'" in r.stderr
    assert_no_traceback(r.stderr)


# ---- through layerforge.cli.main -------------------------------------------------------------------

def test_main_without_a_command_prints_help(capsys):
    assert main([]) == 0
    assert capsys.readouterr().out.startswith("usage: layerforge")


def test_main_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "check" in capsys.readouterr().out


def test_main_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("layerforge ")


def test_main_check_good_file(files, capsys):
    path = str(files / "good.lf")
    assert main(["check", path]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: ok (2 definitions: double, halve)\n" and out.err == ""


def test_main_check_names_definitions_even_for_an_unnormalised_path(files, capsys, monkeypatch):
    monkeypatch.chdir(files)
    assert main(["check", "./good.lf"]) == 0
    assert capsys.readouterr().out == "./good.lf: ok (2 definitions: double, halve)\n"


def test_main_check_bad_file(files, capsys):
    path = str(files / "bad.lf")
    assert main(["check", path]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"{path}:4:14: error: unexpected character '$'\n")
    assert "    return x $ 2.0\n" in out.err


def test_main_check_without_files(capsys):
    assert main(["check"]) == 0
    assert capsys.readouterr().out == "standard library: ok\n"


def test_main_check_reports_every_file_and_fails_if_any_fails(files, capsys):
    good, bad, missing = (str(files / n) for n in ("good.lf", "bad.lf", "missing.lf"))
    assert main(["check", good, bad, missing]) == 1
    out = capsys.readouterr()
    assert out.out == f"{good}: ok (2 definitions: double, halve)\n"
    assert f"{bad}:4:14: error:" in out.err
    assert f"{missing}: error: cannot read file: No such file or directory" in out.err


def test_main_check_nonexistent_file(tmp_path, capsys):
    path = str(tmp_path / "missing.lf")
    assert main(["check", path]) == 1
    assert capsys.readouterr().err == f"{path}: error: cannot read file: No such file or directory\n"


def test_main_check_directory(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"{tmp_path}: error: cannot read file")


def test_main_check_non_utf8_file(files, capsys):
    path = str(files / "latin1.lf")
    assert main(["check", path]) == 1
    assert capsys.readouterr().err.startswith(f"{path}: error: file is not UTF-8 text")


def test_main_check_sees_the_standard_library_unless_told_not_to(files, capsys):
    path = str(files / "uses_stdlib.lf")
    assert main(["check", path]) == 0
    assert capsys.readouterr().out == f"{path}: ok (1 definition: norm_then_silu)\n"
    assert main(["check", "--no-stdlib", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}:1:27: error: unknown dim 'N'" in err
    assert "unknown function 'rms_norm'" in err


def test_main_list_names_the_standard_library(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["layer", "rms_norm(x,"] for line in lines)
    assert any(line.startswith("attention") and "llama_attn(q, k, v" in line for line in lines)


@pytest.mark.parametrize("kernel,marker", [("prefill", "_tcprefill_"), ("decode", "_tcdecode_"), ("simt", "_p16_sm90")])
def test_main_show_attention_kernels(capsys, kernel, marker):
    from layerforge.cli import main
    rc = main(["show", "llama_attn", "--dims", "Hq=32,Hkv=8,D=128", "--arch", "sm_90", "--kernel", kernel])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("// Generated by layerforge: llama_attn_d128_hkv8_hq32_bf16_p16")
    assert marker in out.splitlines()[0]
    assert ("mma.sync" in out) == (kernel != "simt")


@pytest.mark.parametrize("args,message", [
    (["--dims", "Hq=32,Hkv=8,D=72"], "no tensor-core attention specialisation for head dim 72"),
    (["--dims", "Hq=32,Hkv=8,D=128", "--page-size", "12"], "page size must be a power of two, got 12"),
    (["--dims", "Hq=32,Hkv=8,D=128", "--dtype", "f32"], "takes bf16 or f16, not f32"),
])
def test_main_show_attention_errors_are_one_line(capsys, args, message):
    from layerforge.cli import main
    rc = main(["show", "llama_attn", "--arch", "sm_90", *args])
    err = capsys.readouterr().err
    assert rc == 1 and message in err and "Traceback" not in err


# ---- bad inputs to `build` and `show`: one-line errors naming the thing, before any planning -------

@pytest.fixture
def configs(tmp_path):
    (tmp_path / "list.json").write_text("[1, 2]\n")
    (tmp_path / "broken.json").write_text("{\"hidden_size\": \n")
    (tmp_path / "a_file").write_text("")
    return tmp_path


@pytest.mark.parametrize("args,message", [
    (["--config", "{dir}/missing.json"], "error: cannot read --config {dir}/missing.json: No such file or directory"),
    (["--config", "{dir}/list.json"], "error: --config {dir}/list.json must hold a JSON object (a model's "
                                      "config.json), not a list"),
    (["--config", "{dir}/broken.json"], "error: --config {dir}/broken.json is not JSON: "),
    (["--dims", "H=64", "--layers", "rms_norm,rms_nrom"],
     "error: no layer or attention named 'rms_nrom'; did you mean rms_norm"),
    (["--dims", "H=64,Hkvv=8"], "error: --dims Hkvv: no dim or const parameter of that name; did you mean Hkv"),
    (["--dims", "H=64,N=8"], "error: --dims N: 'N' is a dynamic dim, bound at run time from the inputs' shapes"),
    (["--dims", "H=64", "-o", "{dir}/a_file/pack"], "error: cannot write the output folder {dir}/a_file/pack: "
                                                    "Not a directory"),
])
def test_main_build_bad_inputs_are_one_line_errors(configs, capsys, args, message):
    args = [a.format(dir=configs) for a in args]
    if "-o" not in args:
        args += ["-o", str(configs / "pack")]
    rc = main(["build", "--arch", "sm_90", "-q", *args])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(message.format(dir=configs)) and err.count("\n") == 1, err
    assert not (configs / "pack").exists()


def test_main_show_unknown_name_is_a_one_line_error_with_a_hint(capsys):
    assert main(["show", "rms_nrom", "--dims", "H=64", "--arch", "sm_90"]) == 1
    assert capsys.readouterr().err == ("error: no layer or attention named 'rms_nrom'; "
                                       "did you mean rms_norm, add_rms_norm, gemma_rms_norm?\n")


def test_module_build_missing_config_has_no_traceback(tmp_path):
    r = run_module("build", "--config", "missing.json", "--arch", "sm_90", "-o", "pack", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr == "error: cannot read --config missing.json: No such file or directory\n"
