"""The example pack built with `--trt`, and what the layerforge runtime would launch for given
input shapes: the yardstick the plugins' launch parameters are held to.

    expected_launch(entry, shapes) -> Expected(grid, block, shared_mem, args)   # args: int/float values by name

Rows: a pack's LayerModule (runtime/layers.py) binds the dims, shapes the outputs and counts
the rows for those shapes, as before a launch; the grid is the runtime Launcher's. Attention:
the per-token form of runtime/attention.py (PagedAttention.__call__) with num_splits = 1,
whose argument values are the input dims (max_pages, num_pages, num_seqs, ...).
"""
from __future__ import annotations

import importlib.util
import struct
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
    from layerforge.dsl.program import dims_from_config
    from layerforge.runtime.build import build
    build(lf.stdlib(), dims_from_config(str(CONFIG)), dtype="bf16", arch=ARCH, out_dir=out, names=names, trt=True)
    return out


def import_plugins(pack: Path):
    """The generated Python plugin module, imported from the pack (TensorRT or not)."""
    spec = importlib.util.spec_from_file_location("layerforge_trt_plugins", pack / "trt" / "layerforge_trt_plugins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    shapes = [(T, hq, d), (P, page, hkv, d), (P, page, hkv, d), (S, MP), (S,), (T,), (T,)]
    return shapes + [tuple(S if x == "B" else int(x) for x in e["shape"]) for e in i["extra"]]


def expected_launch(pack: Path, entry: dict, shapes: list[tuple[int, ...]]) -> Expected:
    abi = KernelABI.from_json(entry["kernels"][0])
    launcher = Launcher(abi, _NoFunction())
    if entry["family"] == "row":
        return _row(pack, entry, abi, launcher, shapes)
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


def _size(d: str, dims: dict[str, int]) -> int:
    return int(eval(d, {"__builtins__": {}}, dict(dims)))

