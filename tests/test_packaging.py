"""A built wheel carries the grammar, the standard library and the templates as package data."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_package_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("layerforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ["layerforge/__init__.py", "layerforge/cli.py", "layerforge/grammars/layerforge.lark",
                 "layerforge/dsl/program.py", "layerforge/dsl/stdlib/norms.lf", "layerforge/dsl/stdlib/attention.lf",
                 "layerforge/codegen/row.py", "layerforge/templates/cuda/row_kernel.cu.jinja",
                 "layerforge/templates/cuda/common.cuh", "layerforge/runtime/nvrtc.py",
                 "layerforge/templates/cuda/attention_tc.cu.jinja", "layerforge/templates/cuda/attention_hooks.cuh.jinja",
                 "layerforge/templates/cuda/attention_merge.cuh.jinja"]:
        assert must in names, must
    # installed from the wheel alone (no source tree on the path), the stdlib loads and renders
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    code = ("import layerforge, sys; assert 'site' in layerforge.__file__, layerforge.__file__; "
            "from layerforge.codegen.plan import plan_layer; "
            "p = layerforge.stdlib(); print(len(p.names)); "
            "print(plan_layer(p.specialise('rms_norm', H=64, dtype='f32'), 'sm_80').key)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["27", "rms_norm_h64_f32_sm80"]
