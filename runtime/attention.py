"""Attention over a paged KV cache: one generated kernel per attention block.

    attn = PagedAttention(stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), page_size=16)
    out = attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=4096)

q is [T, Hq, D]: the new query tokens of every sequence, concatenated (decode: one per
sequence; chunked prefill: several). q_seq[t] is token t's sequence (a row of page_table)
and q_pos[t] its position. The cache holds K already rotated (see runtime/kv_cache.py);
seq_lens counts the tokens each sequence has in the cache, the new ones included.
Everything is checked before the launch; the split-KV workspace is allocated here, through
torch's allocator, so calls are capturable in CUDA graphs.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..codegen.attention import PagedAttentionPlan, plan_paged_attention
from ..dsl.evaluator import LayerInputError
from ..dsl.program import Layer


class PagedAttention:
    def __init__(self, layer: Layer, *, page_size: int = 16, arch: str | None = None, cache=None,
                 vectors_per_lane: int = 1, **scalars: Any):
        if layer.function.kind != "attention":
            raise TypeError(f"{layer.name} is not an attention block")
        self.layer = layer
        self.spec = layer.function.outputs[0].arg
        self.page_size = page_size
        self.vectors_per_lane = vectors_per_lane
        self.arch = arch
        self._cache = cache
        self.hq, self.hkv = int(self.spec.num_q_heads), int(self.spec.num_kv_heads)
        self.d = int(self.spec.head_dim)
        self.dtype = layer.dtype.torch
        fn = layer.function
        self.extra = [p for p in fn.params[3:] if p.kind == "tensor"]
        self.scalar_params = [p for p in fn.params if p.kind == "scalar"]
        self.scalars = {p.name: scalars.pop(p.name, p.default) for p in self.scalar_params}
        if scalars:
            raise TypeError(f"{layer.name}: unknown scalar arguments {sorted(scalars)}")
        self._plan: PagedAttentionPlan | None = None
        self._kernels: dict[int, tuple] = {}
        self._sms: dict[int, int] = {}

    @property
    def plan(self) -> PagedAttentionPlan:
        if self._plan is None:
            arch = self.arch or "sm_%d%d" % torch.cuda.get_device_capability()
            self._plan = plan_paged_attention(self.layer, arch, page_size=self.page_size,
                                              vectors_per_lane=self.vectors_per_lane)
        return self._plan

    def _load(self, device: torch.device):
        hit = self._kernels.get(device.index)
        if hit is not None:
            return hit
        from .cache import default_cache
        from .driver import CudaModule
        from .nvrtc import CompileOptions
        plan = self.plan
        res = (self._cache or default_cache()).get_or_compile(plan.source(), plan.kernel_name,
                                                              CompileOptions(plan.arch), plan.key)
        module = CudaModule(res.cubin, device)
        types = ["ptr"] * 10 + ["i32"] * 4
        types += ["ptr"] * len(self.extra)
        types += ["f32" if p.dtype.is_float else "i32" for p in self.scalar_params]
        types += ["i64"] * len(plan.table_dims())
        main = module.function(plan.kernel_name, types)
        merge = module.function(plan.merge_name, ["ptr", "ptr", "ptr", "i32"])
        self._kernels[device.index] = (main, merge)
        self._sms[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
        return main, merge

    def _check(self, name, t, dtype, shape=None, ndim=None, device=None):
        if not isinstance(t, torch.Tensor):
            raise LayerInputError(f"{self.layer.name}: '{name}' must be a torch.Tensor")
        if t.dtype != dtype:
            raise LayerInputError(f"{self.layer.name}: '{name}' must be {dtype}, got {t.dtype}")
        if device is not None and t.device != device:
            raise LayerInputError(f"{self.layer.name}: '{name}' is on {t.device}, expected {device}")
        if ndim is not None and t.dim() != ndim:
            raise LayerInputError(f"{self.layer.name}: '{name}' must have {ndim} dims, got shape {tuple(t.shape)}")
        if shape is not None:
            for i, (want, got) in enumerate(zip(shape, t.shape)):
                if want is not None and want != got:
                    raise LayerInputError(f"{self.layer.name}: '{name}' dim {i} must be {want}, got {got} "
                                          f"(shape {tuple(t.shape)})")
        if not t.is_contiguous():
            raise LayerInputError(f"{self.layer.name}: '{name}' must be contiguous")

    def __call__(self, q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, *, max_kv_len: int,
                 extra: dict[str, torch.Tensor] | None = None, num_splits: int | None = None,
                 out: torch.Tensor | None = None, **scalars) -> torch.Tensor:
        dev = q.device if isinstance(q, torch.Tensor) else None
        if dev is None or dev.type != "cuda":
            raise LayerInputError(f"{self.layer.name}: paged attention runs on CUDA tensors")
        if isinstance(q, torch.Tensor) and q.dim() == 3 and (q.shape[1] != self.hq or q.shape[2] != self.d):
            raise LayerInputError(f"{self.layer.name}: q must be [T, {self.hq}, {self.d}] (Hq heads of dim D), "
                                  f"got {tuple(q.shape)}")
        self._check("q", q, self.dtype, (None, self.hq, self.d), 3, dev)
        T = q.shape[0]
        self._check("k_cache", k_cache, self.dtype, (None, self.page_size, self.hkv, self.d), 4, dev)
        if k_cache.shape[2] != self.hkv:
            raise LayerInputError(f"{self.layer.name}: the cache has {k_cache.shape[2]} KV heads, the block {self.hkv}")
        self._check("v_cache", v_cache, self.dtype, tuple(k_cache.shape), 4, dev)
        self._check("page_table", page_table, torch.int32, None, 2, dev)
        S, max_pages = page_table.shape
        self._check("seq_lens", seq_lens, torch.int32, (S,), 1, dev)
        self._check("q_seq", q_seq, torch.int32, (T,), 1, dev)
        self._check("q_pos", q_pos, torch.int32, (T,), 1, dev)
        if max_kv_len > max_pages * self.page_size:
            raise LayerInputError(f"{self.layer.name}: max_kv_len {max_kv_len} is past the page table's capacity "
                                  f"({max_pages} pages of {self.page_size})")
        extra = extra or {}
        unknown = set(extra) - {p.name for p in self.extra}
        if unknown:
            raise LayerInputError(f"{self.layer.name}: unknown extra inputs {sorted(unknown)}")
        tables = []
        dims = {"B": S}
        for p in self.extra:
            if p.name not in extra:
                raise LayerInputError(f"{self.layer.name}: missing extra input '{p.name}'")
            t = extra[p.name]
            shape = tuple(int(d) if getattr(d, "is_Integer", False) else dims.get(str(d)) for d in p.shape)
            self._check(p.name, t, p.dtype.torch, shape, len(p.shape), dev)
            tables.append(t)
        sc = {**self.scalars, **scalars}
        for p in self.scalar_params:
            if sc.get(p.name) is None:
                raise LayerInputError(f"{self.layer.name}: scalar '{p.name}' has no value")
        if out is None:
            out = torch.empty_like(q)
        else:
            self._check("out", out, self.dtype, tuple(q.shape), 3, dev)
        if T == 0:
            return out
        main, merge = self._load(dev)
        plan = self.plan
        nchunk = (self.hq // self.hkv) // plan.heads_per_cta
        ctas = T * self.hkv * nchunk
        if num_splits is None:
            sms = self._sms[dev.index]
            num_splits = 1 if ctas >= sms else max(1, min(math.ceil(2 * sms / ctas), math.ceil(max_kv_len / 256), 64))
        if num_splits > 1:
            part_o = torch.empty((T * self.hq * num_splits * self.d,), dtype=torch.float32, device=dev)
            part_lse = torch.empty((T * self.hq * num_splits,), dtype=torch.float32, device=dev)
        else:
            part_o = part_lse = None
        args = [q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, out, part_o, part_lse,
                max_pages, k_cache.shape[0], S, num_splits]
        args += tables
        args += [sc[p.name] for p in self.scalar_params]
        args += [dims[d] for d in plan.table_dims()]
        main.launch((ctas, num_splits), plan.warps * 32, args)
        if num_splits > 1:
            merge.launch(T * self.hq, self.d, [part_o, part_lse, out, num_splits])
        return out
