"""On a GPU: the PTX a Python AOT plugin hands TensorRT, loaded through the driver API and
launched as TensorRT launches it (inputs, the int32 extras, outputs; grid, block and shared
memory from the plugin's launch function), computes what the runtime's kernel computes, bit
for bit, and matches the reference evaluator (rows, attention) or the runtime's references (the
other families: one plugin a family, fp8 KV caches included).

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


# ---- the other families: one plugin a family, its PTX against the runtime's own launch ----------
# Each case builds inputs on the GPU, runs the runtime's launch code (its own kernels) for `want`,
# and the plugin's PTX entry, launched as TensorRT would, into poisoned outputs (NaN, or -7 for
# int tensors; an output written in place starts from the same input as the runtime's).
NAN_INT = -7


def build_plugin(plan, arch: str):
    """The plugin of `plan` as the Python AOT module serves it: (spec, the module's entry, PTX)."""
    from layerforge.codegen.trt import plugin_specs
    from layerforge.codegen.trt_render import PYTHON_MODULE, aot_entry, render_plugins
    from layerforge.runtime.nvrtc import CompileOptions, compile_cuda
    (spec,), _ = plugin_specs([plan])
    assert spec.qdp_reason is None, spec.qdp_reason
    entry = aot_entry(spec, plan.source())
    text = render_plugins([spec], {}, arch=arch, entries={spec.name: entry}, cubins={spec.name: "unused.cubin"})
    namespace: dict = {"__file__": "<generated>"}
    exec(compile(text[PYTHON_MODULE], PYTHON_MODULE, "exec"), namespace)
    ptx = compile_cuda(entry.source, entry.name, CompileOptions(arch), want_ptx=True, want_cubin=False).ptx
    return spec, namespace["PLUGINS"][spec.name], ptx.encode() if isinstance(ptx, str) else ptx


_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "int32": torch.int32,
          "int8": torch.int8, "fp8": torch.float8_e4m3fn}


def run_family_plugin(plan, inputs: dict, attributes: dict | None = None) -> list[torch.Tensor]:
    """The plugin's outputs for `inputs` (by the plugin's input names), poisoned first."""
    from layerforge.runtime.launch import device_arch
    spec, plugin, ptx = build_plugin(plan, device_arch())
    tensors = [inputs[t.name] for t in spec.inputs]
    outputs = []
    for i, (shape, dtype) in enumerate(plugin["shapes"](*[tuple(t.shape) for t in tensors])):
        alias = spec.aliases[i] if i < len(spec.aliases) else -1
        if alias >= 0:
            outputs.append(tensors[alias])
            continue
        t = _TORCH[dtype]
        fill = float("nan") if t.is_floating_point else NAN_INT
        outputs.append(torch.full(tuple(shape), fill, dtype=torch.float32 if t.is_floating_point else t,
                                  device="cuda").to(t))
    values = [(attributes or {})[a.name] for a in spec.attributes]
    launch = plugin["launch"](*[tuple(t.shape) for t in tensors], *values)
    types = ["ptr"] * len(tensors) + ["i32"] * len(launch.extra_args) + ["ptr"] * len(outputs)
    kernel = load_entry(ptx, plugin["kernel"], types)
    kernel.launch(launch.grid, launch.block, [*tensors, *launch.extra_args, *outputs], shared_mem=launch.shared_mem)
    torch.cuda.synchronize()
    return outputs


def runtime_plan(call):
    """The plan the runtime launches for `call()` (its launch recorded, nothing run)."""
    from .families import Recorder
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        call()
        return rec.take()[-1][0]


def same(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, what
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w), what


def _bf16(*shape):
    return torch.randn(*shape, device="cuda").to(torch.bfloat16)


def test_gemv_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import linear
    from .families import meta
    n, k, m = 256, 512, 5
    x, w, bias, res = _bf16(m, k), _bf16(n, k) * 0.05, _bf16(n), _bf16(m, n)
    want = linear.launch_gemv(x, [w], n, k, bias, None, res, None, 0.0, None)
    plan = runtime_plan(lambda: linear.launch_gemv(meta(m, k), [meta(n, k)], n, k, meta(n), None, meta(m, n), None,
                                                   0.0, None))
    got = run_family_plugin(plan, {"x": x, "w": w, "bias": bias, "residual": res})
    same(got, [want], plan.key)
    ref = (x.float() @ w.float().T + bias.float() + res.float())
    torch.testing.assert_close(got[0].float(), ref, rtol=2e-2, atol=5e-2)


def test_dequant_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import quant
    qw = quant.QuantLinear.from_float(torch.randn(256, 512), 128, wtype="u4", dtype=torch.bfloat16).qw
    qw = quant.QuantWeight(qw.wtype, qw.group, qw.qweight.cuda(), qw.wgroup.cuda(), None, qw.n, qw.k, qw.dtype)
    want = quant.dequantize_cuda(qw)
    plan = runtime_plan(lambda: quant.dequantize_cuda(_meta_quant(qw)))
    same(run_family_plugin(plan, {"w": qw.qweight, "wgroup": qw.wgroup}), [want], plan.key)
    torch.testing.assert_close(want.float().cpu(), quant.dequantize(qw).float().cpu(), rtol=1e-2, atol=1e-2)


def _meta_quant(qw):
    from layerforge.runtime import quant
    from .families import meta
    m = [None if t is None else meta(*t.shape, dtype=t.dtype) for t in (qw.qweight, qw.wgroup, qw.wscale)]
    return quant.QuantWeight(qw.wtype, qw.group, *m, qw.n, qw.k, qw.dtype)


def test_fp8_row_quantiser_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import quant
    from .families import meta
    x = _bf16(37, 512) * 3
    want = list(quant.quantize_fp8_rows_cuda(x))
    plan = runtime_plan(lambda: quant.quantize_fp8_rows_cuda(meta(37, 512)))
    got = run_family_plugin(plan, {"x": x})
    same(got, want, plan.key)
    q, scale = quant.quantize_fp8_rows(x)   # the reference's bytes and scales, exactly
    assert torch.equal(got[0].view(torch.uint8), q.view(torch.uint8)) and torch.equal(got[1], scale)


def test_selective_state_update_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import scan
    from .families import meta
    b, d, n = 3, 64, 16
    state = torch.randn(b, d, n, device="cuda")
    x, dt, z = _bf16(b, d), _bf16(b, d), _bf16(b, d)
    A, D, db = -torch.rand(d, n, device="cuda"), torch.randn(d, device="cuda"), torch.randn(d, device="cuda")
    B, C = _bf16(b, n), _bf16(b, n)
    mine, theirs = state.clone(), state.clone()
    y = scan.selective_state_update(theirs, x, dt, A, B, C, D, z, db)
    plan = runtime_plan(lambda: scan.selective_state_update(meta(b, d, n, dtype=torch.float32), meta(b, d), meta(b, d),
                                                            meta(d, n, dtype=torch.float32), meta(b, n), meta(b, n),
                                                            meta(d, dtype=torch.float32), meta(b, d),
                                                            meta(d, dtype=torch.float32)))
    got = run_family_plugin(plan, {"state": mine, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z,
                                   "dt_bias": db})
    same(got, [theirs, y], plan.key)
    assert got[0] is mine   # written in place
    ref_state = state.cpu()
    ref = scan.selective_state_update_reference(ref_state, *(t.cpu() for t in (x, dt, A, B, C, D, z, db)))
    torch.testing.assert_close(got[1].cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0].cpu(), ref_state, rtol=1e-4, atol=1e-4)


def test_causal_conv_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import scan
    from .families import meta
    b, d, length, kw = 2, 64, 700, 4
    x, w, bias, init = _bf16(b, d, length), _bf16(d, kw), _bf16(d), _bf16(b, d, kw - 1)
    want = list(scan.causal_conv1d(x, w, bias, initial_state=init, return_final_state=True))
    plan = runtime_plan(lambda: scan.causal_conv1d(meta(b, d, length), meta(d, kw), meta(d),
                                                   initial_state=meta(b, d, kw - 1), return_final_state=True))
    got = run_family_plugin(plan, {"x": x, "weight": w, "bias": bias, "initial_state": init})
    same(got, want, plan.key)
    ref = scan.causal_conv1d_reference(x.cpu(), w.cpu(), bias.cpu(), initial_state=init.cpu(), return_final_state=True)
    torch.testing.assert_close(got[0].cpu().float(), ref[0].float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(got[1].cpu(), ref[1])   # the last inputs, copied


def test_ssd_state_update_plugin_ptx_computes_what_the_runtime_does():
    from layerforge.runtime import ssd
    from .families import meta
    bt, h, p, g, n = 3, 4, 64, 1, 64
    state = torch.randn(bt, h, p, n, device="cuda")
    x, dt, B, C = _bf16(bt, h, p), _bf16(bt, h), _bf16(bt, g, n), _bf16(bt, g, n)
    A, D, dtb = -torch.rand(h, device="cuda"), torch.randn(h, device="cuda"), torch.randn(h, device="cuda")
    mine, theirs = state.clone(), state.clone()
    y = ssd.ssd_state_update(theirs, x, dt, A, B, C, D=D, dt_bias=dtb, dt_limit=(0.01, 4.0))
    f32 = torch.float32
    plan = runtime_plan(lambda: ssd.ssd_state_update(meta(bt, h, p, n, dtype=f32), meta(bt, h, p), meta(bt, h),
                                                     meta(h, dtype=f32), meta(bt, g, n), meta(bt, g, n),
                                                     D=meta(h, dtype=f32), dt_bias=meta(h, dtype=f32),
                                                     dt_limit=(0.01, 4.0)))
    got = run_family_plugin(plan, {"state": mine, "x": x, "dt": dt, "B": B, "C": C, "A": A, "dt_bias": dtb, "D": D},
                            {"dt_lo": 0.01, "dt_hi": 4.0})
    same(got, [theirs, y], plan.key)
    ref_state = state.cpu()
    ref = ssd.ssd_state_update_reference(ref_state, x.cpu(), dt.cpu(), A.cpu(), B.cpu(), C.cpu(), D=D.cpu(),
                                         dt_bias=dtb.cpu(), dt_limit=(0.01, 4.0))
    torch.testing.assert_close(got[1].cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0].cpu(), ref_state, rtol=1e-4, atol=1e-4)


def test_moe_plugins_ptx_compute_what_the_runtime_does():
    from layerforge.runtime import moe_kernels
    from .families import meta
    t, k, hidden, experts = 6, 2, 256, 8
    ids = torch.randint(0, experts, (t, k), dtype=torch.int32, device="cuda")
    want = list(moe_kernels.moe_align(ids, experts, active=True))
    plan = runtime_plan(lambda: moe_kernels.moe_align(meta(t, k, dtype=torch.int32), experts, active=True))
    got = run_family_plugin(plan, {"ids": ids})
    same(got[:3], want[:3], plan.key)   # the active list's order is free; its set and count are not
    for g, r in zip(got[:3], moe_kernels.moe_align_reference(ids.cpu(), experts)):
        assert torch.equal(g.cpu(), r)
    n = int(want[3][-1])
    assert int(got[3][-1]) == n and set(got[3][:n].tolist()) == set(want[3][:n].tolist())
    offsets, pos, src = want[:3]
    x = _bf16(t, hidden)
    xs = moe_kernels.moe_gather(x, src)
    plan = runtime_plan(lambda: moe_kernels.moe_gather(meta(t, hidden), meta(t * k, dtype=torch.int32)))
    same(run_family_plugin(plan, {"x": x, "src": src}), [xs], plan.key)
    w = torch.rand(t, k, device="cuda")
    shared, gate, res = _bf16(t, hidden), _bf16(t), _bf16(t, hidden)
    out = moe_kernels.moe_combine(xs, pos, w, shared=shared, gate_logit=gate, residual=res)
    plan = runtime_plan(lambda: moe_kernels.moe_combine(meta(t * k, hidden), meta(t * k, dtype=torch.int32),
                                                        meta(t, k, dtype=torch.float32), shared=meta(t, hidden),
                                                        gate_logit=meta(t), residual=meta(t, hidden)))
    got = run_family_plugin(plan, {"y": xs, "pos": pos, "w": w, "shared": shared, "gate_logit": gate, "residual": res})
    same(got, [out], plan.key)
    ref = moe_kernels.moe_combine_reference(*(t.cpu() for t in (xs, pos, w)), shared=shared.cpu(), gate_logit=gate.cpu(),
                                            residual=res.cpu(), precision="float64")
    torch.testing.assert_close(got[0].cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_lora_shrink_plugin_ptx_computes_what_the_runtime_kernel_does():
    """The shrink kernel launched as runtime/lora.py MultiLoRA.shrink does (its launch line), on
    tokens sorted by slot through moe_align's permutation, against the plugin's PTX."""
    from layerforge.codegen.lora import plan_lora_shrink
    from layerforge.runtime.launch import device_arch, load_plan
    from layerforge.runtime.moe_kernels import moe_align
    K, R, S, adapters, T = 512, 16, 2, 3, 7
    plan = plan_lora_shrink("bf16", k=K, rank=R, slices=S, arch=device_arch())
    x, a = _bf16(T, K), _bf16(adapters + 1, S * R, K)
    ranks = torch.randint(1, R + 1, (adapters + 1, S), dtype=torch.int32, device="cuda")
    slot = torch.randint(0, adapters + 1, (T, 1), dtype=torch.int32, device="cuda")
    offsets, _, src = moe_align(slot, adapters + 1)
    want = torch.zeros(T, S * R, dtype=torch.bfloat16, device="cuda")
    load_plan(plan, x.device)((adapters, T), [x, a, ranks, offsets, src, want, T])
    got = run_family_plugin(plan, {"x": x, "a": a, "ranks": ranks, "offsets": offsets, "src": src})[0]
    written = torch.arange(S * R, device="cuda")[None, :] % R < ranks[slot[:, 0].long()].repeat_interleave(R, 1)
    written &= (slot < adapters)   # the no-adapter group's rows are not written
    assert torch.equal(got[written], want[written]) and not got[~written].isnan().logical_not().any()
    e = slot[:, 0].long()   # v[t] = A_e x[t] in f32, rounded once
    ref = torch.einsum("tk,trk->tr", x.double(), a[e].double()).to(torch.bfloat16)
    torch.testing.assert_close(got[written].float(), ref[written].float(), rtol=2e-2, atol=2e-2)


def test_mla_append_plugin_ptx_computes_what_the_runtime_kernel_does():
    """runtime/mla_cache.py's launch line (a layer's rows, dense latent and k_pe, meta [2, T])."""
    from layerforge.codegen.mla import plan_mla_append
    from layerforge.dsl.ir import RopeSpec
    from layerforge.runtime.launch import device_arch, load_plan
    plan = plan_mla_append(rope=RopeSpec(10000.0, "gptj", 64), arch=device_arch())
    P, T, row = 6, 5, 576
    cache = _bf16(P, plan.page_size, row)
    latent, k_pe = _bf16(T, 512), _bf16(T, 64)
    pages = torch.randint(0, P, (T,), dtype=torch.int32)
    meta_ = torch.stack([pages, torch.randperm(P * plan.page_size)[:T].int()]).cuda()
    theirs, mine = cache.clone(), cache.clone()
    load_plan(plan, cache.device)((T,), [theirs, latent, k_pe, latent.stride(0), k_pe.stride(0), meta_, T])
    got = run_family_plugin(plan, {"cache": mine, "latent": latent, "k_pe": k_pe, "meta": meta_})
    same(got, [theirs], plan.key)


def _fp8_block_and_plans():
    from layerforge.codegen.attention import plan_paged_attention
    from layerforge.codegen.kv_append import plan_kv_append
    from layerforge.runtime.launch import device_arch
    layer = lf.stdlib().specialise("llama_attn", dtype="bf16",
                                   **lf.stdlib().bindings_for("llama_attn", dims_from_config(str(CONFIG))))
    paged = plan_paged_attention(layer, device_arch(), kv_dtype="fp8_e4m3")
    spec = paged.spec
    append = plan_kv_append("bf16", int(spec.num_kv_heads), int(spec.head_dim), 16, spec.rope, device_arch(),
                            kv_dtype="fp8_e4m3")
    return layer, paged, append


def test_fp8_cache_plugins_ptx_compute_what_the_runtime_kernels_do():
    """The append into an fp8 cache (per-head scales), then decode-form attention over it: each
    plugin's PTX against the runtime's kernel launched with the arguments by ref (runtime/kv_cache.py
    with no queued updates; runtime/attention.py's per-token form with num_splits = 1)."""
    from layerforge.runtime.launch import load_plan
    layer, paged, append = _fp8_block_and_plans()
    hkv, d, page = append.num_kv_heads, append.head_dim, append.page_size
    hq = int(paged.spec.num_q_heads)
    T, S, MP, P = 6, 3, 8, 32
    dev = torch.device("cuda")
    k_cache = (torch.randn(P, page, hkv, d, device=dev) * 20).to(torch.float8_e4m3fn)
    v_cache = (torch.randn(P, page, hkv, d, device=dev) * 20).to(torch.float8_e4m3fn)
    k_scale, v_scale = torch.rand(hkv, device=dev) * 0.1 + 0.01, torch.rand(hkv, device=dev) * 0.1 + 0.01
    k, v = _bf16(T, hkv, d), _bf16(T, hkv, d)
    meta_ = torch.stack([torch.randperm(P)[:T], torch.randperm(MP * page)[:T]]).int().to(dev)
    theirs = [k_cache.clone(), v_cache.clone()]
    values = dict(k_cache=theirs[0], v_cache=theirs[1], k=k, v=v, k_stride=hkv * d, v_stride=hkv * d, meta=meta_,
                  num_tokens=T, num_len_updates=0, num_page_updates=0, seq_lens=None, page_table=None,
                  k_scale=k_scale, v_scale=v_scale)
    load_plan(append, dev)((T, 0), [values[a.ref] for a in append.abi.args])
    mine = [k_cache.clone(), v_cache.clone()]
    got = run_family_plugin(append, {"k_cache": mine[0], "v_cache": mine[1], "k": k, "v": v, "meta": meta_,
                                     "k_scale": k_scale, "v_scale": v_scale})
    same(got, theirs, append.key)

    page_table = torch.randperm(P)[: S * MP].reshape(S, MP).int().to(dev)
    seq_lens = torch.tensor([1, 77, MP * page], dtype=torch.int32, device=dev)
    q_seq = torch.tensor([0, 1, 1, 2, 2, 2], dtype=torch.int32, device=dev)
    q_pos = (seq_lens[q_seq.long()] - 1 - torch.tensor([0, 0, 5, 0, 9, 100], device=dev)).int()
    q = _bf16(T, hq, d)
    want = torch.full_like(q, float("nan"))
    values = {"q": q, "k_cache": theirs[0], "v_cache": theirs[1], "page_table": page_table, "seq_lens": seq_lens,
              "k_scale": k_scale, "v_scale": v_scale, "q_seq": q_seq, "q_pos": q_pos, "0": want, "out": want,
              "part_o": None, "part_lse": None, "max_pages": MP, "num_pages": P, "num_seqs": S, "num_splits": 1}
    load_plan(paged, dev)((T, 1), [values[a.ref] for a in paged.abi.args])
    got = run_family_plugin(paged, {"q": q, "k_cache": theirs[0], "v_cache": theirs[1], "page_table": page_table,
                                    "seq_lens": seq_lens, "k_scale": k_scale, "v_scale": v_scale, "q_seq": q_seq,
                                    "q_pos": q_pos})
    same(got, [want], paged.key)
    assert not got[0].isnan().any()
    # the reference over the cache's values (e4m3 times the head's scale, exact in f32, then bf16)
    from layerforge.runtime.attention import PagedAttention
    k_values = (theirs[0].float() * k_scale[:, None]).to(torch.bfloat16).cpu()
    v_values = (theirs[1].float() * v_scale[:, None]).to(torch.bfloat16).cpu()
    ref = PagedAttention(layer, page_size=page)(q.cpu(), k_values, v_values, *(t.cpu() for t in (page_table, seq_lens,
                                                                                              q_seq, q_pos)),
                                                max_kv_len=MP * page)
    torch.testing.assert_close(got[0].cpu().float(), ref.float(), rtol=3e-2, atol=3e-2)
