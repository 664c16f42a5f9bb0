"""On a GPU: the PTX a Python AOT plugin hands TensorRT, loaded through the driver API and
launched as TensorRT launches it (inputs, the int32 extras, outputs; grid, block and shared
memory from the plugin's launch function), computes what the runtime's kernel computes, bit
for bit, and matches the reference evaluator.

No TensorRT here: this checks the kernel, the argument order and the launch parameters the
plugin gives TensorRT, not TensorRT's own launch."""
from types import SimpleNamespace

import pytest
import torch

import layerforge as lf
from layerforge.dsl.evaluator import evaluate
from layerforge.dsl.program import dims_from_config
from layerforge.dsl.types import DType

from ..devices import requires_gpu
from .pack import CONFIG, build_trt_pack, import_plugins, row_input_shapes

pytestmark = [pytest.mark.gpu, requires_gpu]

ROWS = ["rms_norm", "add_rms_norm", "swiglu", "rope"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return build_trt_pack(tmp_path_factory.mktemp("trt_gpu_pack"), ROWS + ["llama_attn"])


def load_entry(ptx: bytes, name: str, arg_types: list[str]):
    """The entry kernel from PTX (the driver JIT-compiles it), as a runtime LoadedKernel."""
    from cuda.bindings import driver as cu
    from layerforge.runtime.driver import LoadedKernel, _current, check, primary_context
    context = primary_context(torch.cuda.current_device())
    with _current(context):
        handle = check(cu.cuModuleLoadData(ptx + b"\0"), "cuModuleLoadData(PTX)")
    module = SimpleNamespace(device_index=torch.cuda.current_device(), context=context, handle=handle)
    return LoadedKernel(module, name, arg_types)


def run_plugin(pack, plugin, inputs: list, outputs: list, attributes: list) -> None:
    launch = plugin["launch"](*[tuple(t.shape) for t in inputs], *attributes)
    types = ["ptr"] * len(inputs) + ["i32"] * len(launch.extra_args) + ["ptr"] * len(outputs)
    kernel = load_entry((pack / "trt" / plugin["ptx"]).read_bytes(), plugin["kernel"], types)
    kernel.launch(launch.grid, launch.block, [*inputs, *launch.extra_args, *outputs], shared_mem=launch.shared_mem)
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", ROWS)
def test_row_plugin_ptx_computes_what_the_runtime_kernel_does(pack, name):
    import json
    manifest = json.loads((pack / "manifest.json").read_text())
    entry = next(e for e in manifest["kernels"] if e["family"] == "row" and e["layer"] == name)
    plugin = import_plugins(pack).PLUGINS[entry["key"]]
    params = [p for p in entry["interface"]["params"] if p["kind"] == "tensor"]
    scalars = {p["name"]: p["default"] for p in entry["interface"]["params"] if p["kind"] == "scalar"}
    inputs = {}
    for p, shape in zip(params, row_input_shapes(entry, {"N": 37, "Nh": 8})):
        dtype = DType[p["dtype"]].torch
        inputs[p["name"]] = (torch.randint(0, 4096, shape, dtype=dtype) if not dtype.is_floating_point
                             else torch.randn(shape).to(dtype)).cuda()
    module = lf.load_pack(pack).layer(name, device="cuda", **scalars)
    for dsl_name, attr in module._weights.items():
        getattr(module, attr).data.copy_(inputs[dsl_name])
    want = module(*[inputs[n] for n in module.input_names])
    want = list(want) if isinstance(want, tuple) else [want]
    got = [torch.full_like(w, float("nan")) for w in want]   # poisoned
    run_plugin(pack, plugin, [inputs[p["name"]] for p in params], got, list(scalars.values()))
    for g, w in zip(got, want):
        assert torch.equal(g, w), name
    layer = lf.stdlib().specialise(name, dtype="bf16", **lf.stdlib().bindings_for(name, dims_from_config(str(CONFIG))))
    ref = evaluate(layer.function, {**{k: v.cpu() for k, v in inputs.items()}, **scalars})
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.cpu().float(), r.float(), rtol=2e-2, atol=2e-2)


def test_attention_plugin_ptx_computes_what_the_runtime_kernel_does(pack):
    """The CUDA-core kernel in the per-token form, num_splits = 1: the plugin's PTX against the
    pack's cubin launched by the runtime's Launcher (arguments by ref, as runtime/attention.py
    fills them) and against the reference evaluator (the attention module on CPU tensors)."""
    import json

    from layerforge.codegen.abi import KernelABI
    from layerforge.runtime.attention import PagedAttention
    from layerforge.runtime.launch import load_kernels
    manifest = json.loads((pack / "manifest.json").read_text())
    entry = next(e for e in manifest["kernels"] if e["family"] == "paged_attention")
    plugin = import_plugins(pack).PLUGINS[entry["key"]]
    T, S, MP, P, page = 6, 3, 8, 32, entry["page_size"]
    hq, hkv, d = (entry["interface"][k] for k in ("num_q_heads", "num_kv_heads", "head_dim"))
    dev = torch.device("cuda")
    k_cache = torch.randn(P, page, hkv, d).to(torch.bfloat16).to(dev)
    v_cache = torch.randn(P, page, hkv, d).to(torch.bfloat16).to(dev)
    page_table = torch.randperm(P)[: S * MP].reshape(S, MP).int().to(dev)
    seq_lens = torch.tensor([1, 77, MP * page], dtype=torch.int32, device=dev)
    q_seq = torch.tensor([0, 1, 1, 2, 2, 2], dtype=torch.int32, device=dev)
    q_pos = (seq_lens[q_seq.long()] - 1 - torch.tensor([0, 0, 5, 0, 9, 100], device=dev)).int()
    q = torch.randn(T, hq, d).to(torch.bfloat16).to(dev)
    args = (q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos)

    abi = KernelABI.from_json(entry["kernels"][0])
    runtime_kernel = load_kernels((pack / entry["cubin"]).read_bytes(), (abi,), dev)[abi.name]
    want = torch.full_like(q, float("nan"))
    values = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "page_table": page_table, "seq_lens": seq_lens,
              "q_seq": q_seq, "q_pos": q_pos, "0": want, "out": want, "part_o": None, "part_lse": None, "max_pages": MP,
              "num_pages": P, "num_seqs": S, "num_splits": 1}
    runtime_kernel((T, 1), [values[a.ref] for a in abi.args])   # the ABI's order, each by its ref
    got = torch.full_like(q, float("nan"))
    run_plugin(pack, plugin, list(args), [got], [])
    assert torch.equal(got, want)

    layer = lf.stdlib().specialise("llama_attn", dtype="bf16",
                                   **lf.stdlib().bindings_for("llama_attn", dims_from_config(str(CONFIG))))
    ref = PagedAttention(layer, page_size=page)(*(t.cpu() for t in args), max_kv_len=MP * page)
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
