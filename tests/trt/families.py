"""What the runtime launches for the kernel families beyond rows, attention and the KV append:
the yardstick their TensorRT plugins are held to (tests/trt/test_family_plugins.py).

    cases = family_cases()    # [Case]: a plan, the plugin's inputs and attributes, the runtime's launch

Most cases run the runtime's own launch code on meta tensors (no GPU, no NVRTC): the loaders
it calls (launch.load_plan, launch.device_arch and the modules' kernel caches) are replaced by a
recorder, so each case holds the plan the runtime picked, the problem sizes it gave the grid and
the arguments it passed, in the ABI's order. Where the launch cannot run without CUDA tensors
(LoRA's store, the MLA modules: CUDA-only checks, pinned memory) the case restates the
arguments their launch lines pass, as pack.py does for attention; the fp8 attention and append
cases use pack.py's yardstick itself.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from operator import itemgetter
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import layerforge as lf
from layerforge.codegen.abi import KernelABI
from layerforge.codegen.attention import plan_paged_attention
from layerforge.codegen.attention_tc import plan_tc_attention
from layerforge.codegen.block_mask import plan_block_mask
from layerforge.codegen.gemm import plan_gemm
from layerforge.codegen.gemv import plan_gemv
from layerforge.codegen.kv_append import plan_kv_append
from layerforge.codegen.lora import plan_lora_expand, plan_lora_shrink
from layerforge.codegen.mla import plan_mla_append, plan_mla_decode
from layerforge.codegen.plan import KernelPlan, plan_layer
from layerforge.dsl.ir import RopeSpec
from layerforge.dsl.program import dims_from_config
from layerforge.runtime import launch as launch_module
from layerforge.runtime import linear, moe, moe_kernels, quant, scan, ssd
from layerforge.runtime.build import manifest_entry
from layerforge.runtime.layers import _dim_spec, module as layer_module

from .pack import ARCH, CONFIG, _append, _attention, append_input_shapes, attention_input_shapes

META = torch.device("meta")
# torch dtype -> the plugin's dtype name (codegen/trt.py TRT_DTYPES)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32", torch.int32: "i32",
               torch.int8: "i8", torch.float8_e4m3fn: "fp8_e4m3", torch.int64: "i64"}


@dataclass
class Case:
    id: str
    plan: KernelPlan
    inputs: dict[str, tuple[tuple[int, ...], str]]   # the plugin's inputs by name: (shape, dtype name)
    attributes: dict[str, Any]                       # the plugin's attributes by name
    grid: tuple[int, int, int]                       # what the runtime's launch computes
    values: dict[str, Any]                           # int / float arguments by ABI name, as the runtime passes them
    tensors: dict[str, Any] = field(default_factory=dict)   # pointer arguments by ABI name: (shape, dtype) or None
                                                            # (null); empty where the case does not restate them


def meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def _described(t) -> tuple[tuple[int, ...], str] | None:
    return None if t is None else (tuple(t.shape), DTYPE_NAMES[t.dtype])


def from_launch(id: str, plan: KernelPlan, problem, args, inputs: dict[str, torch.Tensor],
                attributes: dict[str, Any] | None = None, abi: KernelABI | None = None) -> Case:
    """A case from one launch of the runtime (problem sizes and arguments in the ABI's order)."""
    abi = abi or plan.abi
    assert len(args) == len(abi.args), (id, len(args), [a.name for a in abi.args])
    values, tensors = {}, {}
    for a, v in zip(abi.args, args):
        if a.is_pointer:
            tensors[a.name] = _described(v)
        else:
            values[a.name] = v
    return Case(id, plan, {n: _described(t) for n, t in inputs.items()}, dict(attributes or {}),
                abi.grid_for(*problem), values, tensors)


class Recorder:
    """Stands in for the runtime's loaded kernels: each launch is kept, none is run."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[KernelPlan, tuple, list]] = []
        monkeypatch.setattr(launch_module, "load_plan", lambda plan, device, cache=None: self._kernel(plan))
        monkeypatch.setattr(launch_module, "device_arch", lambda device=None: ARCH)
        for m in (linear, moe, moe_kernels, scan, ssd):
            monkeypatch.setattr(m, "_KERNELS", {})
        monkeypatch.setattr(quant, "_DEQUANT", {})
        for m in (moe_kernels, scan, ssd):   # meta tensors take the kernel path
            monkeypatch.setattr(m, "_use_kernel", lambda t: True)
        monkeypatch.setattr(linear, "device_properties", lambda device: SimpleNamespace(multi_processor_count=132))

    def _kernel(self, plan):
        def launch(problem, args):
            self.launches.append((plan, tuple(problem), list(args)))
        return launch

    def take(self) -> list[tuple[KernelPlan, tuple, list]]:
        out, self.launches = self.launches, []
        return out

    def one(self) -> tuple[KernelPlan, tuple, list]:
        (got,) = self.take()
        return got


# ---- the cases -----------------------------------------------------------------------------------
def _products(rec: Recorder) -> list[Case]:
    cases = []
    n, k = 256, 512
    for m in (1, 5, 8):   # one plan (8 rows) for all three
        x, w, bias, res = meta(m, k), meta(n, k), meta(n), meta(m, n)
        linear.launch_gemv(x, [w], n, k, bias, None, res, None, 0.0, None)
        cases.append(from_launch(f"gemv_bias_res_m{m}", *rec.one(), {"x": x, "w": w, "bias": bias, "residual": res}))
    x, w, gamma = meta(12, k), meta(2 * n, k), meta(k)
    linear.launch_gemv(x, [w], 2 * n, k, None, "silu", None, (gamma, 1e-5), 0.0, None)
    cases.append(from_launch("gemv_silu_rms_m12", *rec.one(), {"x": x, "w": w, "gamma": gamma}, {"eps": 1e-5}))
    weight = torch.randn(n, k)
    for wtype, group, m in (("u4", 128, 3), ("i8", 0, 8), ("i8", 64, 2), ("f8e4m3", 128, 2), ("f8e4m3", 0, 5)):
        qw = quant.QuantLinear.from_float(weight, group, wtype=wtype, dtype=torch.bfloat16).qw   # the runtime's layout
        ws = [meta(*t.shape, dtype=t.dtype) for t in qw.kernel_tensors]
        x = meta(m, k)
        linear.launch_gemv(x, ws, n, k, None, None, None, None, 0.0, None, wtype=wtype, group=group)
        names = ["w", "wscale" if wtype == "f8e4m3" or not group else "wgroup"]
        cases.append(from_launch(f"gemv_{wtype}g{group}_m{m}", *rec.one(), {"x": x, **dict(zip(names, ws))}))
        qm = quant.QuantWeight(wtype, group, *[meta(*t.shape, dtype=t.dtype) if t is not None else None
                                               for t in (qw.qweight, qw.wgroup, qw.wscale)], n, k, torch.bfloat16)
        quant.dequantize_cuda(qm)
        cases.append(from_launch(f"dequant_{wtype}g{group}", *rec.one(), dict(zip(names, qm.kernel_tensors))))
    # expert products: 3 tokens x 2 choices over 4 experts (gathered, the listed experts' grid)
    E, T, kk = 4, 3, 2
    x, w, offsets, src, active = meta(T, k), meta(E, n, k), meta(E + 1, dtype=torch.int32), \
        meta(T * kk, dtype=torch.int32), meta(E + 1, dtype=torch.int32)
    moe.expert_product(x, w, offsets, src, rows=T * kk, gated="silu", active=active)
    cases.append(from_launch("gemv_experts_gather_active", *rec.one(),
                             {"x": x, "w": w, "offsets": offsets, "src": src, "active": active}))
    for wtype, group in (("u4", 128), ("i8", 0)):   # quantised experts, stacked as runtime/moe.py _Experts.quantize_
        qs = [quant.QuantLinear.from_float(torch.randn(n, k), group, wtype=wtype, dtype=torch.bfloat16).qw.kernel_tensors
              for _ in range(E)]
        q, sc = (meta(E, *t[0].shape, dtype=t[0].dtype) for t in zip(*qs))
        x, offsets = meta(T * kk, k), meta(E + 1, dtype=torch.int32)
        moe.expert_product(x, moe.QuantExperts(wtype, group, q, sc, n, k, torch.bfloat16), offsets, None, rows=T * kk)
        cases.append(from_launch(f"gemv_experts_{wtype}g{group}", *rec.one(),
                                 {"x": x, "w": q, "wgroup" if group else "wscale": sc, "offsets": offsets}))
    xs, fixed, offsets = meta(T * (kk + 1), k), meta(1, n, k), meta(E + 2, dtype=torch.int32)
    moe.expert_product(xs, w, offsets, None, rows=T * (kk + 1), fixed=fixed)
    cases.append(from_launch("gemv_experts_fixed", *rec.one(), {"x": xs, "w": w, "w_fixed": fixed, "offsets": offsets}))
    for m in (100, 300):
        x, w, res = meta(m, k), meta(n, k), meta(m, n)
        linear.launch_gemv(x, [w], n, k, None, None, res, None, 0.0, None, wgmma="wgmma")
        cases.append(from_launch(f"gemm_res_m{m}", *rec.one(), {"x": x, "w": w, "residual": res}))
    for m in (1, 37):
        x = meta(m, k)
        quant.quantize_fp8_rows_cuda(x)
        cases.append(from_launch(f"quant_rows_m{m}", *rec.one(), {"x": x}))
        quant.quantize_fp8_rows_cuda(x, group=0)   # one scale a token (the Hopper FP8 GEMM's)
        cases.append(from_launch(f"quant_rows_tok_m{m}", *rec.one(), {"x": x}))
    return cases


def _scans(rec: Recorder) -> list[Case]:
    cases = []
    d, kw, n = 64, 4, 16
    for b, length in ((1, 1), (3, 700)):
        x, weight, bias, init = meta(b, d, length), meta(d, kw), meta(d, dtype=torch.float32), meta(b, d, kw - 1)
        scan.causal_conv1d(x, weight, bias, initial_state=init, return_final_state=True)
        cases.append(from_launch(f"conv_init_final_b{b}_l{length}", *rec.one(),
                                 {"x": x, "weight": weight, "bias": bias, "initial_state": init}))
    x, weight = meta(2, d, 9), meta(d, kw)
    scan.causal_conv1d(x, weight, activation=None)
    cases.append(from_launch("conv_plain", *rec.one(), {"x": x, "weight": weight}))
    x, state, weight, bias = meta(5, d), meta(5, d, kw, dtype=torch.float32), meta(d, kw), meta(d)
    scan.causal_conv1d_update(x, state, weight, bias)
    cases.append(from_launch("conv_update", *rec.one(), {"x": x, "conv_state": state, "weight": weight, "bias": bias}))
    b, length = 2, 33
    u, delta, A, B, C = meta(b, d, length), meta(b, d, length), meta(d, n, dtype=torch.float32), \
        meta(b, n, length), meta(b, n, length)
    D, z, db, init = meta(d, dtype=torch.float32), meta(b, d, length), meta(d, dtype=torch.float32), \
        meta(b, d, n, dtype=torch.float32)
    scan.selective_scan(u, delta, A, B, C, D, z, db, initial_state=init, return_final_state=True)
    cases.append(from_launch("selective_scan", *rec.one(), {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D,
                                                            "z": z, "delta_bias": db, "initial_state": init}))
    state, x, dt, Bs, Cs = meta(b, d, n, dtype=torch.float32), meta(b, d), meta(b, d), meta(b, n), meta(b, n)
    scan.selective_state_update(state, x, dt, A, Bs, Cs, D, None, db)
    cases.append(from_launch("selective_state_update", *rec.one(), {"state": state, "x": x, "dt": dt, "A": A, "B": Bs,
                                                                    "C": Cs, "D": D, "dt_bias": db}))
    return cases


def _ssd(rec: Recorder) -> list[Case]:
    # Bt and L of at least 2: runtime/ssd.py passes 0 as the stride of an axis of size 1 (it never
    # multiplies a nonzero index there), the plugin the dense stride
    bt, length, h, p, g, n, chunk = 2, 150, 4, 64, 1, 64, 64
    f32 = torch.float32
    x, dt, B, C, z = meta(bt, length, h, p), meta(bt, length, h), meta(bt, length, g, n), meta(bt, length, g, n), \
        meta(bt, length, h, p)
    A, D, dtb, init = meta(h, dtype=f32), meta(h, dtype=f32), meta(h, dtype=f32), meta(bt, h, p, n, dtype=f32)
    limits = {"dt_lo": 0.0, "dt_hi": math.inf}
    # the form that computes the scores (TensorRT's: codegen/trt.py serves no pair of launches sharing a table)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAYERFORGE_SSD_CB", "0")
        ssd.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dtb, chunk_size=chunk, initial_state=init,
                     return_final_state=True)
    (state_plan, sp, sa), (pass_plan, pp, pa), (scan_plan, cp, ca) = rec.take()
    by_name = lambda plan, args: dict(zip((a.name for a in plan.abi.args), args))   # noqa: E731
    st, ps = by_name(state_plan, sa), by_name(pass_plan, pa)
    step = {"x": x, "dt": dt, "B": B, "A": A, "dt_bias": dtb}
    cases = [from_launch("ssd_chunk_state", state_plan, sp, sa, step, limits),
             from_launch("ssd_state_passing", pass_plan, pp, pa,
                         {"states": st["states"], "s_last": st["s_last"], "initial": init}),
             from_launch("ssd_chunk_scan", scan_plan, cp, ca, {**step, "C": C, "z": z, "D": D, "start": ps["start"]},
                         limits)]
    state, x1, dt1, B1, C1 = meta(3, h, p, n, dtype=f32), meta(3, h, p), meta(3, h), meta(3, g, n), meta(3, g, n)
    ssd.ssd_state_update(state, x1, dt1, A, B1, C1, D=D, dt_bias=dtb, dt_limit=(0.5, 8.0))
    cases.append(from_launch("ssd_state_update", *rec.one(),
                             {"state": state, "x": x1, "dt": dt1, "B": B1, "C": C1, "A": A, "dt_bias": dtb, "D": D},
                             {"dt_lo": 0.5, "dt_hi": 8.0}))
    # the Mamba2 mixer's decode step: A given as A_log, A_log / D / dt_bias in the model dtype, the gate
    Ab, Db, dtbb, z1 = meta(h), meta(h), meta(h), meta(3, h, p)
    ssd.ssd_state_update(state, x1, dt1, Ab, B1, C1, D=Db, z=z1, dt_bias=dtbb, a_log=True)
    cases.append(from_launch("ssd_state_update_alog", *rec.one(), {"state": state, "x": x1, "dt": dt1, "B": B1, "C": C1,
                                                                   "z": z1, "A": Ab, "dt_bias": dtbb, "D": Db}, limits))
    return cases


def _moe(rec: Recorder) -> list[Case]:
    cases = []
    for t in (1, 9):
        ids = meta(t, 2, dtype=torch.int32)
        moe_kernels.moe_align(ids, 8, active=True)
        cases.append(from_launch(f"moe_align_t{t}", *rec.one(), {"ids": ids}))
    x, src = meta(5, 256), meta(10, dtype=torch.int32)
    moe_kernels.moe_gather(x, src)
    cases.append(from_launch("moe_gather", *rec.one(), {"x": x, "src": src}))
    t, k, hidden = 6, 2, 256
    y, pos, w = meta(t * k, hidden), meta(t * k, dtype=torch.int32), meta(t, k, dtype=torch.float32)
    shared, gate, res = meta(t, hidden), meta(t), meta(t, hidden)
    moe_kernels.moe_combine(y, pos, w, shared=shared, gate_logit=gate, residual=res)
    cases.append(from_launch("moe_combine", *rec.one(), {"y": y, "pos": pos, "w": w, "shared": shared,
                                                         "gate_logit": gate, "residual": res}))
    return cases


def _lora() -> list[Case]:
    """runtime/lora.py MultiLoRA.shrink and .expand (into a new out), their launch lines restated:
    shrink((adapters, T), [x2, lora_a, ranks, offsets, src, v, T]); expand((E + 1, T), [y, y.stride(0),
    v, v.stride(0), vslot, lora_b, ranks, scales, offsets, src, bias, out, T, E])."""
    K, R, slices, adapters, T = 512, 16, (256, 128), 3, 7
    S, O = len(slices), sum(slices)
    shrink = plan_lora_shrink("bf16", k=K, rank=R, slices=S, arch=ARCH)
    x, a = meta(T, K), meta(adapters + 1, S * R, K)
    ranks, offsets, src = meta(adapters + 1, S, dtype=torch.int32), meta(adapters + 2, dtype=torch.int32), \
        meta(T, dtype=torch.int32)
    v = meta(T, S * R)
    cases = [from_launch("lora_shrink", shrink, (adapters, T), [x, a, ranks, offsets, src, v, T],
                         {"x": x, "a": a, "ranks": ranks, "offsets": offsets, "src": src})]
    expand = plan_lora_expand("bf16", slices=slices, rank=R, bias=True, arch=ARCH)
    y, b, scales, bias, out = meta(T, O), meta(adapters + 1, R, O), meta(adapters + 1, S, dtype=torch.float32), \
        meta(O), meta(T, O)
    args = [y, y.stride(0), v, v.stride(0), 0, b, ranks, scales, offsets, src, bias, out, T, adapters]
    cases.append(from_launch("lora_expand", expand, (adapters + 1, T), args,
                             {"y": y, "v": v, "b": b, "ranks": ranks, "scales": scales, "offsets": offsets, "src": src,
                              "bias": bias}))
    return cases


def _mla() -> list[Case]:
    """runtime/mla_decode.py (num_splits = 1: no parts, no merge) and runtime/mla_cache.py
    _write_cuda, their launch lines restated."""
    plan = plan_mla_decode(num_heads=16, arch=ARCH, kernel="mma")   # sm_90's default reads a TMA map: no plugin
    T, S, MP, P, row = 5, 3, 4, 20, plan.latent_dim + plan.rope_dim
    q, cache, page_table, seq_lens, q_seq = meta(T, 16, row), meta(P, plan.page_size, row), \
        meta(S, MP, dtype=torch.int32), meta(S, dtype=torch.int32), meta(T, dtype=torch.int32)
    out = meta(T, 16, plan.latent_dim)
    values = dict(q=q, cache=cache, page_table=page_table, seq_lens=seq_lens, q_seq=q_seq, out=out, part_o=None,
                  part_lse=None, scale=0.1, max_pages=MP, num_pages=P, num_seqs=S, num_splits=1)
    args = itemgetter(*(a.ref for a in plan.abi.args))(values)
    cases = [from_launch("mla_decode", plan, (T, 1), args,
                         {"q": q, "cache": cache, "page_table": page_table, "seq_lens": seq_lens, "q_seq": q_seq},
                         {"scale": 0.1})]
    append = plan_mla_append(rope=RopeSpec(10000.0, "gptj", 64), arch=ARCH)
    latent, k_pe, meta_ = meta(T, 512), meta(T, 64), meta(2 * T, dtype=torch.int32).view(2, T)
    cases.append(from_launch("mla_append", append, (T,), [cache, latent, k_pe, latent.stride(0), k_pe.stride(0),
                                                          meta_, T],
                             {"cache": cache, "latent": latent, "k_pe": k_pe, "meta": meta_}))
    return cases


def _route() -> list[Case]:
    """The grouped MoE router: a LayerModule's row count for the shapes (as pack.py's rows)."""
    mod = layer_module("moe_route_grouped", E=64, n_group=8, topk_group=4, k=6, dtype="f32")
    plan = plan_layer(mod.layer, ARCH)
    cases = []
    for n in (1, 13):
        tensors = {"logits": meta(n, 64, dtype=torch.float32), "bias": meta(64, dtype=torch.float32)}
        mod._lead = [_dim_spec(d) for d in plan.describe()["rows"]]
        mod._launch_for = lambda device, vec_bytes: None
        _, out_shapes, rows = mod._recipe(tensors, tuple((t.shape, t.dtype, t.device) for t in tensors.values()))
        args = [tensors["logits"], tensors["bias"], meta(*out_shapes[0], dtype=torch.float32),
                meta(*out_shapes[1], dtype=torch.int32), rows]
        cases.append(from_launch(f"moe_route_grouped_n{n}", plan, (rows,), args, tensors))
    return cases


def _fp8_cache() -> list[Case]:
    """Decode-form attention and the append over an fp8 cache, held to pack.py's yardstick."""
    program = lf.stdlib()
    layer = program.specialise("llama_attn", dtype="bf16",
                               **program.bindings_for("llama_attn", dims_from_config(str(CONFIG))))
    plans = [plan_paged_attention(layer, ARCH, kv_dtype="fp8_e4m3"),
             plan_tc_attention(layer, ARCH, mode="decode", kv_dtype="fp8_e4m3")]
    spec = plans[0].spec
    append = plan_kv_append("bf16", int(spec.num_kv_heads), int(spec.head_dim), 16, spec.rope, ARCH, kv_dtype="fp8_e4m3")
    cases = []
    for plan in plans:
        entry = manifest_entry(plan)
        names = ["q", "k_cache", "v_cache", "page_table", "seq_lens", "k_scale", "v_scale", "q_seq", "q_pos"]
        dtypes = ["bf16", "fp8_e4m3", "fp8_e4m3", "i32", "i32", "f32", "f32", "i32", "i32"]
        for T, S, MP, P in ((1, 1, 1, 1), (5, 3, 9, 40)):
            shapes = attention_input_shapes(entry, T, S, MP, P)
            want = _attention(entry, plan.abi, _grid_of(plan.abi), shapes)
            cases.append(Case(f"{plan.family}_fp8_t{T}", plan, dict(zip(names, zip(shapes, dtypes))), {},
                              want.grid, want.args))
    entry = manifest_entry(append)
    for T, P in ((1, 1), (5, 40)):
        shapes = append_input_shapes(entry, T, P)
        want = _append(append.abi, _grid_of(append.abi), shapes)
        names = ["k_cache", "v_cache", "k", "v", "meta", "k_scale", "v_scale"]
        dtypes = ["fp8_e4m3", "fp8_e4m3", "bf16", "bf16", "i32", "f32", "f32"]
        cases.append(Case(f"kv_append_fp8_t{T}", append, dict(zip(names, zip(shapes, dtypes))), {}, want.grid,
                          want.args))
    return cases


def _grid_of(abi: KernelABI):
    return SimpleNamespace(grid=abi.grid_for)


def family_cases() -> list[Case]:
    with pytest.MonkeyPatch.context() as mp:
        rec = Recorder(mp)
        cases = _products(rec) + _scans(rec) + _ssd(rec) + _moe(rec)
    return cases + _lora() + _mla() + _route() + _fp8_cache()


DOC_MASK = """
dims Hq, Hkv, D
dynamic B, S, Skv
attention doc(q: T[B, S, Hq, D], k: T[B, Skv, Hkv, D], v: T[B, Skv, Hkv, D], doc: i32[B, Skv]) -> T[B, S, Hq, D] {
    mask = kv_pos <= q_pos and doc[b, kv_pos] == doc[b, q_pos]
}
"""


@functools.cache
def excluded_plans() -> dict[str, KernelPlan]:
    """Plans whose kernels TensorRT's plugin interface cannot serve, by a key phrase of the reason."""
    doc = lf.loads(DOC_MASK, "doc.lf", with_stdlib=False).specialise("doc", dtype="bf16", Hq=8, Hkv=2, D=64)
    fp8_decode = plan_tc_attention(lf.stdlib().specialise("llama_attn", dtype="bf16", Hq=32, Hkv=8, D=128), ARCH,
                                   mode="decode", kv_dtype="fp8_e4m3", tma=True)
    return {"tensor maps": plan_gemm("bf16", n=256, k=512, tma=True), "is a TMA tensor map": fp8_decode,
            "SM count": plan_gemm("bf16", n=256, k=512, tma=True, persistent=True),
            "max_q_len": plan_block_mask(doc, ARCH, rows=64, keys=64)}


def gemv_plan(**kw) -> KernelPlan:
    return plan_gemv("bf16", n=256, k=512, arch=ARCH, **kw)
