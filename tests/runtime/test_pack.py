"""Packs (`layerforge build` output) load without a compiler: modules from the manifest's
ABIs and interfaces and the cubins, checked against their checksums; bad packs are clear
errors. The GPU case runs the pack's kernels against the reference with NVRTC hidden."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layerforge as lf
from layerforge.runtime.pack import PackError, load_pack

from ..devices import requires_gpu

pytest.importorskip("layerforge.runtime.nvrtc")
ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/llama-3-8b/config.json"
LAYERS = ["rms_norm", "swiglu", "rms_norm_gate_up_swiglu", "llama_attn"]   # a row, a product, attention


def build_pack(out: Path, arch: str) -> Path:
    from layerforge.runtime.build import build
    from layerforge.dsl.program import dims_from_config
    build(lf.stdlib(), dims_from_config(str(CONFIG)), dtype="bf16", arch=arch, out_dir=out, names=LAYERS)
    return out


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory):
    arch = "sm_%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "sm_90"
    return build_pack(tmp_path_factory.mktemp("pack"), arch)


def run_case(pack: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.runtime.pack_case", str(pack), *args], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})


def test_pack_loads_with_nvrtc_hidden_and_without_parsing(pack_dir):
    r = run_case(pack_dir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded ['rms_norm', 'rms_norm_gate_up_swiglu', 'swiglu'] ['llama_attn']" in r.stdout


def test_manifest_describes_every_kernel_with_its_abi(pack_dir):
    m = json.loads((pack_dir / "manifest.json").read_text())
    fams = sorted(e["family"] for e in m["kernels"])
    prefill = "wgmma_attention" if m["arch"] == "sm_90" else "tc_attention"   # Hopper: the wgmma prefill
    # tensor-core decode, and its kernel for grids past one wave of its tile (decode_many: D128, a bf16 cache)
    assert fams == sorted(["kv_append", "paged_attention", "row", "row", "tc_attention", "tc_attention", prefill,
                           "gemv", "gemv"])
    for e in m["kernels"]:
        for k in e["kernels"]:
            assert k["name"].startswith("lf_") and k["args"] and k["block"][0] > 0
            assert k["problem"] or e["family"] == "gemv"   # a product kernel's grid is fixed by its N
    tc = [e for e in m["kernels"] if e["family"] in ("tc_attention", "wgmma_attention")]
    assert all(len(e["kernels"]) == 2 and e["kernels"][0]["shared_bytes"] > 0 for e in tc)   # main + merge


def test_corrupt_or_missing_cubin_is_a_clear_error(pack_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(pack_dir, bad)
    victim = next(bad.glob("rms_norm_*.cubin"))
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    with pytest.raises(PackError, match="does not match the manifest's checksum"):
        load_pack(bad, check_device=False)
    victim.unlink()
    with pytest.raises(PackError, match="cannot be read"):
        load_pack(bad, check_device=False)


@pytest.mark.parametrize("field,value,match", [("format", 1, "pack format 1"),
                                               ("layerforge", "0.0.1", "built by layerforge 0.0.1")])
def test_other_format_or_version_is_refused(pack_dir, tmp_path, field, value, match):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(pack_dir, other)
    m = json.loads((other / "manifest.json").read_text())
    m[field] = value
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackError, match=match):
        load_pack(other, check_device=False)


def test_other_arch_is_refused(pack_dir, monkeypatch):
    pack = load_pack(pack_dir, check_device=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(PackError, match="built for sm_.*this GPU is sm_75"):
        pack.check_device()


def test_unknown_names_and_cpu_tensors_are_clear_errors(pack_dir):
    pack = load_pack(pack_dir, check_device=False)
    with pytest.raises(PackError, match="no row or product layer 'layer_norm'"):
        pack.layer("layer_norm")
    norm = pack.layer("rms_norm")
    with pytest.raises(lf.LayerInputError, match="runs CUDA tensors only"):
        norm(torch.ones(2, norm.weight.shape[0], dtype=torch.bfloat16))


@pytest.mark.gpu
@requires_gpu
def test_pack_kernels_match_the_reference_with_nvrtc_hidden(pack_dir):
    r = run_case(pack_dir, "--run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "decode and prefill from the pack: ok" in r.stdout


def test_a_name_built_twice_is_picked_by_dims_or_consts(tmp_path):
    """A Qwen3 pack has rms_norm at the hidden size and at the head dim: the pack makes the
    caller say which, instead of silently taking one."""
    from layerforge.models.families import definitions_for, spec_from_config
    from layerforge.runtime.build import build
    spec = spec_from_config({"model_type": "qwen3", "vocab_size": 64, "hidden_size": 256, "intermediate_size": 512,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "head_dim": 64, "rms_norm_eps": 1e-6})
    defs = [(n, b) for n, b in definitions_for(spec) if n == "rms_norm"]
    assert len(defs) == 2
    build(lf.stdlib(), {}, dtype="bf16", arch="sm_90", out_dir=tmp_path, definitions=defs)
    pack = load_pack(tmp_path, check_device=False)
    with pytest.raises(PackError, match=r"'rms_norm' is in the pack 2 times .*pass dims="):
        pack.layer("rms_norm")
    assert pack.layer("rms_norm", dims={"H": 64}).weight.shape == (64,)
    assert pack.layer("rms_norm", dims={"H": 256}).weight.shape == (256,)
    with pytest.raises(PackError, match="no row layer 'rms_norm' with dims"):
        pack.layer("rms_norm", dims={"H": 128})
