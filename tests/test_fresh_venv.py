"""`pip install` of layerforge into a fresh venv, with no CUDA toolkit in sight, compiles kernels.

scripts/check-fresh-venv.sh does the work: a venv without system site packages, torch and this
checkout's `.[cuda]` from the package index, CUDA_HOME/CUDA_PATH unset; it asserts that
libnvrtc and the CUDA headers are the venv's own, then compiles one row kernel and every kernel
of the example model. Minutes long (it installs torch), so `slow`; skipped when no index answers.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "check-fresh-venv.sh"
PIP_FAILED = 3  # the script's exit status when pip could not install


def _package_index_unreachable() -> str | None:
    """Why pip cannot install from an index here, or None when it can."""
    try:
        probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "nvidia-cuda-runtime"],
                               capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "pip found no package index within 120 s"
    if probe.returncode != 0 or "13." not in probe.stdout:
        last_line = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        return f"pip cannot list nvidia-cuda-runtime: {last_line}"
    return None


@pytest.mark.slow
def test_a_fresh_venv_without_a_cuda_toolkit_compiles_every_example_kernel():
    reason = _package_index_unreachable()
    if reason:
        pytest.skip(reason)
    hidden_toolkit = {"CUDA_HOME": "/usr/local/cuda", "CUDA_PATH": "/usr/local/cuda"}  # unset by the script
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=1500,
                         env={**os.environ, **hidden_toolkit, "PYTHON": sys.executable})
    output = run.stdout + run.stderr
    assert run.returncode != PIP_FAILED, "pip could not install into the venv:\n" + output[-4000:]
    assert run.returncode == 0, output[-4000:]
    venv = re.escape(re.search(r"^== venv (\S+)$", output, re.M).group(1))
    assert re.search(rf"^nvrtc 13\.\d+ {venv}/\S+/nvidia/cu13/lib/libnvrtc\.so", output, re.M)
    assert re.search(rf"^headers {venv}/\S+/nvidia/cu13/include$", output, re.M)
    cubins = re.search(r"^cubins: (.*)$", output, re.M).group(1).split()
    for family in ("rms_norm_h4096", "swiglu_f14336", "prefill_", "_tcdecode_",
                   "kv_append_hkv8_d128"):  # rows, prefill (tc, or wgmma on sm_90) and decode attention, the append
        assert any(family in name for name in cubins), (family, cubins)
    assert f"ok: {len(cubins)} cubins compiled in a fresh venv" in output
