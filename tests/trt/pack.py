"""The example pack built with `--trt`, and what the layerforge runtime would launch for given
input shapes: the yardstick the plugins' launch parameters are held to.

    expected_launch(entry, shapes) -> Expected(grid, block, shared_mem, args)   # args: int/float values by name

Rows: a pack's LayerModule (runtime/layers.py) binds the dims, shapes the outputs and counts
the rows for those shapes, as before a launch; the grid is the runtime Launcher's. Attention:
the per-token form of runtime/attention.py (PagedAttention.__call__) with num_splits = 1,
whose argument values are the input dims (max_pages, num_pages, num_seqs, ...). KV append:
runtime/kv_cache.py's launch with no queued length or page-table updates.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import layerforge as lf
from layerforge.codegen.abi import KernelABI
from layerforge.dsl.types import DType
from layerforge.runtime.launch import Launcher
from layerforge.runtime.layers import _dim_spec
from layerforge.runtime.pack import load_pack

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/llama-3-8b/config.json"
ARCH = "sm_90"


def build_trt_pack(out: Path, names: list[str] | None = None) -> Path:
    """The example model's pack with TensorRT plugins: every stdlib definition its dims bind (or
    `names`) but the product layers (linear.lf, quant.lf), whose plugins test_family_plugins.py checks
    with the other small-token products'."""
    from layerforge.dsl.program import dims_from_config
    from layerforge.runtime.build import build
    program = lf.stdlib()
    if names is None:
        names = [n for n in program.names
                 if program.definition(n).span.file not in ("<stdlib>/linear.lf", "<stdlib>/quant.lf")]
    build(program, dims_from_config(str(CONFIG)), dtype="bf16", arch=ARCH, out_dir=out, names=names, trt=True)
    return out


def import_plugins(pack: Path):
    """The generated Python plugin module, imported from the pack (TensorRT or not)."""
    spec = importlib.util.spec_from_file_location("layerforge_trt_plugins", pack / "trt" / "layerforge_trt_plugins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tensorrt_stand_in(tmp_path: Path) -> Path:
    """A folder for PYTHONPATH holding `tensorrt`: the inert stand-in for TensorRT's C extension
    with TensorRT's own `tensorrt/plugin` Python sources ($TENSORRT_PLUGIN_SRC) inside."""
    package = tmp_path / "tensorrt"
    package.mkdir(exist_ok=True)
    shutil.copy(Path(__file__).with_name("tensorrt_stand_in.py"), package / "__init__.py")
    if not (package / "plugin").exists():
        (package / "plugin").symlink_to(Path(os.environ["TENSORRT_PLUGIN_SRC"]) / "tensorrt" / "plugin")
    return tmp_path


def run_tensorrt_validators(module_path: Path, tmp_path: Path) -> dict[str, list[str]]:
    """Import a generated plugin module with tensorrt.plugin's sources over the stand-in, so that
    its decorators' signature validators run; -> each registered plugin: [has aot_impl, has
    autotune, inputs]."""
    script = (f"import importlib.util\n"
              f"spec = importlib.util.spec_from_file_location('p', {str(module_path)!r})\n"
              f"m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
              f"from tensorrt.plugin._lib import QDP_REGISTRY\n"
              f"for k, d in QDP_REGISTRY.items():\n"
              f"    print(k, d.aot_impl_func is not None, d.autotune_func is not None, ','.join(d.input_tensor_names))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tensorrt_stand_in(tmp_path))})
    assert r.returncode == 0, r.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in r.stdout.splitlines()}


def run_symbolic_check(module_path: Path, cases: list, tmp_path: Path) -> dict:
    """tests/trt/symbolic_check.py over a generated module: cases [(key, input shapes, attribute
    values)] evaluated on tensorrt.plugin's ShapeExprs against the same functions on ints."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("symbolic_check.py")), str(module_path),
                        str(tmp_path / "cases.json")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(tensorrt_stand_in(tmp_path))})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@dataclass
class Expected:
    grid: tuple
    block: tuple
    shared_mem: int
    args: dict            # the kernel's int and float arguments by name, as the runtime passes them
    outputs: list         # output shapes


class _NoFunction:
    """Stands in for a loaded kernel: the Launcher's grid needs none (and no GPU)."""

    def set_max_dynamic_shared_mem(self, nbytes: int) -> None:
        pass


def f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def row_input_shapes(entry: dict, dims: dict[str, int]) -> list[tuple[int, ...]]:
    return [tuple(_size(d, dims) for d in p["shape"]) for p in entry["interface"]["params"] if p["kind"] == "tensor"]


def attention_input_shapes(entry: dict, T: int, S: int, MP: int, P: int) -> list[tuple[int, ...]]:
    i = entry["interface"]
    hq, hkv, d, page = i["num_q_heads"], i["num_kv_heads"], i["head_dim"], entry["page_size"]
    scales = [(hkv,), (hkv,)] if entry.get("kv_dtype") else []   # an fp8 cache's k_scale, v_scale
    shapes = [(T, hq, d), (P, page, hkv, d), (P, page, hkv, d), (S, MP), (S,), *scales, (T,), (T,)]
    return shapes + [tuple(S if x == "B" else int(x) for x in e["shape"]) for e in i["extra"]]


def append_input_shapes(entry: dict, T: int, P: int) -> list[tuple[int, ...]]:
    cache = (P, entry["page_size"], entry["num_kv_heads"], entry["head_dim"])
    token = (T, entry["num_kv_heads"], entry["head_dim"])
    scales = [(entry["num_kv_heads"],)] * 2 if entry.get("kv_dtype") else []   # an fp8 cache's k_scale, v_scale
    return [cache, cache, token, token, (2, T), *scales]


def input_shapes(entry: dict, case: int) -> list[tuple[int, ...]]:
    """Input shapes of case 0, 1 or 2 (small to large) for any served kernel."""
    if entry["family"] == "row":
        return row_input_shapes(entry, [dict(N=1, Nh=1), dict(N=7, Nh=32), dict(N=300, Nh=8)][case])
    if entry["family"] == "kv_append":
        return append_input_shapes(entry, *[(1, 1), (5, 40), (300, 4096)][case])
    return attention_input_shapes(entry, **[dict(T=1, S=1, MP=1, P=1), dict(T=5, S=3, MP=9, P=40),
                                            dict(T=64, S=64, MP=256, P=4096)][case])


def expected_launch(pack: Path, entry: dict, shapes: list[tuple[int, ...]]) -> Expected:
    abi = KernelABI.from_json(entry["kernels"][0])
    launcher = Launcher(abi, _NoFunction())
    if entry["family"] == "row":
        return _row(pack, entry, abi, launcher, shapes)
    if entry["family"] == "kv_append":
        return _append(abi, launcher, shapes)
    return _attention(entry, abi, launcher, shapes)


def _row(pack, entry, abi, launcher, shapes) -> Expected:
    module = load_pack(pack, check_device=False).layer(entry["layer"])
    names = [p["name"] for p in entry["interface"]["params"] if p["kind"] == "tensor"]
    dtypes = [p["dtype"] for p in entry["interface"]["params"] if p["kind"] == "tensor"]
    tensors = {n: torch.empty(s, dtype=DType[t].torch, device="meta") for n, s, t in zip(names, shapes, dtypes)}
    module._lead = [_dim_spec(d) for d in entry["rows"]]       # what loading the kernel would set
    module._launch_for = lambda device, vec_bytes: None         # no GPU: the recipe needs the row space only
    sig = tuple((t.shape, t.dtype, t.device) for t in tensors.values())
    dims, out_shapes, rows = module._recipe(tensors, sig)
    args = {}
    for a in abi.args:
        if a.role == "scalar":
            args[a.name] = module._scalars[a.ref]
        elif a.role == "dim":
            args[a.name] = rows if a.ref == "rows" else dims[a.ref]
    return Expected(launcher.grid(rows), abi.block, abi.shared_bytes, args, [tuple(s) for s in out_shapes])


def _attention(entry, abi, launcher, shapes) -> Expected:
    q, k_cache, _, page_table = shapes[:4]
    T, (S, MP), P = q[0], page_table, k_cache[0]
    values = {"max_pages": MP, "num_pages": P, "num_seqs": S, "num_splits": 1, "num_tokens": T, "B": S,
              **{s["name"]: s["default"] for s in entry["interface"]["scalars"]}}
    # runtime/attention.py, per-token form: the CUDA-core kernel launches on (T, num_splits),
    # the tensor-core decode kernel on (chunks = T, max_q_len = 1, num_splits)
    problem = (T, 1) if entry["family"] == "paged_attention" else (T, 1, 1)
    args = {a.name: values[a.ref] for a in abi.args if a.role in ("dim", "scalar")}
    return Expected(launcher.grid(*problem), abi.block, abi.shared_bytes, args, [tuple(q)])


def _append(abi, launcher, shapes) -> Expected:
    cache, _, k, v = shapes[:4]
    T = k[0]
    # runtime/kv_cache.py: kernel((T, U + W), ...) with k_stride = k.stride(0); no queued updates here
    values = {"k_stride": k[1] * k[2], "v_stride": v[1] * v[2], "num_tokens": T, "num_len_updates": 0,
              "num_page_updates": 0}
    args = {a.name: values[a.ref] for a in abi.args if a.role in ("dim", "scalar")}
    return Expected(launcher.grid(T, 0), abi.block, abi.shared_bytes, args, [tuple(cache), tuple(cache)])


def _size(d: str, dims: dict[str, int]) -> int:
    return int(eval(d, {"__builtins__": {}}, dict(dims)))

