"""A built wheel carries every module, the grammar, the standard library and the templates, and\ndeclares the CUDA wheels (NVRTC and its headers) as its `cuda` extra."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# checkout folder -> where the wheel puts it (pyproject.toml's package-dir)
STAGE_PACKAGES = {"layerforge": "layerforge", "grammars": "layerforge/grammars", "dsl": "layerforge/dsl",
                  "codegen": "layerforge/codegen", "templates": "layerforge/templates",
                  "runtime": "layerforge/runtime", "models": "layerforge/models"}
SHIPPED_SUFFIXES = {".py", ".lark", ".lf", ".jinja", ".cuh"}


@pytest.mark.slow
def test_wheel_contains_package_data(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("layerforge-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    # every source module, template, grammar and stdlib file of the checkout, under its package
    for folder, package in STAGE_PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts:
                shipped = f"{package}/{path.relative_to(ROOT / folder).as_posix()}"
                assert shipped in names, f"{path.relative_to(ROOT)} is not in the wheel as {shipped}"
    # the CUDA headers are a declared dependency of the `cuda` extra, of NVRTC's major version
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line for line in archive.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:") and "extra == \"cuda\"" in line]
    for package in ("nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "cuda-bindings"):
        (line,) = [r for r in requires if r.split()[1].startswith(package)]
        assert "<14" in line and ">=13" in line, line
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
    assert r.stdout.split() == ["63", "rms_norm_h64_f32_sm80"]   # + mamba2.lf (3), ssm.lf (6), quant.lf (12); rows.lf has moe_route_limited
