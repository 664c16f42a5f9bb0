"""Attention over a paged KV cache: kernels generated from each attention block.

    attn = PagedAttention(stdlib().specialise("llama_attn", Hq=32, Hkv=8, D=128, dtype="bf16"), page_size=16)
    out = attn(q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, max_kv_len=4096)      # per token
    out = attn.prefill(q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, max_q_len=512,
                       max_kv_len=4096)                                                        # ragged

q is [T, Hq, D]: the new query tokens of every sequence, concatenated. In the per-token form
q_seq[t] is token t's sequence (a row of page_table) and q_pos[t] its position (decode: one
token per sequence). In the ragged form, sequence s owns q rows cu_seqlens[s] ..
cu_seqlens[s+1]-1, which are its last tokens (prefill, chunked prefill over a cached prefix).
The cache holds K already rotated (see runtime/kv_cache.py); seq_lens counts the tokens each
sequence has in the cache, the new ones included.

kernel="tc" runs the tensor-core kernels (codegen/attention_tc.py; the default from sm_80 on),
kernel="simt" the CUDA-core one (codegen/attention.py; the default before sm_80), which
serves only the per-token form.
Everything is checked before the launch; the split-KV workspace is allocated here, through
torch's allocator, so calls are capturable in CUDA graphs. CPU tensors run the DSL's
reference evaluator instead (slow, exact; bad page tables are errors there).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..codegen.attention import PagedAttentionPlan, plan_paged_attention, table_dims
from ..codegen.attention_tc import TCAttentionPlan, plan_tc_attention
from ..dsl.evaluator import LayerInputError
from ..dsl.program import Layer


class PagedAttention:
    def __init__(self, layer: Layer, *, page_size: int = 16, arch: str | None = None, cache=None,
                 kernel: str | None = None, tiles: dict | None = None, **scalars: Any):
        if layer.function.kind != "attention":
            raise TypeError(f"{layer.name} is not an attention block")
        if kernel not in (None, "tc", "simt"):
            raise ValueError(f"kernel must be 'tc' or 'simt' (None: 'tc' from sm_80 on), got {kernel!r}")
        self._kernel = kernel
        self.tiles = dict(tiles or {})   # mode -> codegen.attention_tc.TileConfig, to override the default tiles
        self.layer = layer
        self.spec = layer.function.outputs[0].arg
        self.page_size = page_size
        self.arch = arch
        self._cache = cache
        self.hq, self.hkv = int(self.spec.num_q_heads), int(self.spec.num_kv_heads)
        self.d = int(self.spec.head_dim)
        self.dtype = layer.dtype.torch
        fn = layer.function
        self.extra = [p for p in fn.params[3:] if p.kind == "tensor"]
        self.scalar_params = [p for p in fn.params if p.kind == "scalar"]
        self.table_dims = table_dims(layer)   # dims of the extra inputs passed as ints (sympy: once, not per call)
        self.scalars = {p.name: scalars.pop(p.name, p.default) for p in self.scalar_params}
        if scalars:
            raise TypeError(f"{layer.name}: unknown scalar arguments {sorted(scalars)}")
        self._plan: PagedAttentionPlan | None = None
        self._tc_plans: dict[str, TCAttentionPlan] = {}
        self._kernels: dict[tuple, tuple] = {}
        self._sms: dict[int, int] = {}

    @property
    def target(self) -> str:
        return self.arch or "sm_%d%d" % torch.cuda.get_device_capability()

    @property
    def kernel(self) -> str:
        """'tc' (tensor cores, sm_80 and newer) or 'simt' (CUDA cores, any GPU)."""
        if self._kernel is None:
            self._kernel = "tc" if int(self.target.removeprefix("sm_").rstrip("a")) >= 80 else "simt"
        return self._kernel

    @property
    def plan(self) -> PagedAttentionPlan:
        if self._plan is None:
            self._plan = plan_paged_attention(self.layer, self.target, page_size=self.page_size)
        return self._plan

    def tc_plan(self, mode: str) -> TCAttentionPlan:
        plan = self._tc_plans.get(mode)
        if plan is None:
            plan = plan_tc_attention(self.layer, self.target, page_size=self.page_size, mode=mode,
                                     tiles=self.tiles.get(mode), cache=self._cache)
            self._tc_plans[mode] = plan
        return plan

    def _load(self, device: torch.device, mode: str | None = None):
        """(main, merge) kernels of the CUDA-core plan (mode None) or of a tensor-core plan."""
        hit = self._kernels.get((device.index, mode))
        if hit is not None:
            return hit
        from .cache import default_cache
        from .driver import CudaModule
        from .nvrtc import CompileOptions
        plan = self.plan if mode is None else self.tc_plan(mode)
        res = (self._cache or default_cache()).get_or_compile(plan.source(), plan.kernel_name,
                                                              CompileOptions(plan.arch), plan.key)
        module = CudaModule(res.cubin, device)
        types = ["ptr"] * 10 + ["i32"] * 4 if mode is None else ["ptr"] * 11 + ["i32"] * 5
        types += ["ptr"] * len(self.extra)
        types += ["f32" if p.dtype.is_float else "i32" for p in self.scalar_params]
        types += ["i64"] * len(self.table_dims)
        main = module.function(plan.kernel_name, types)
        if mode is not None:
            main.set_max_dynamic_shared_mem(plan.shared_bytes)   # before any graph capture
        merge = module.function(plan.merge_name, ["ptr", "ptr", "ptr", "i32"])
        self._kernels[(device.index, mode)] = (main, merge)
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

    def _common_checks(self, q, k_cache, v_cache, page_table, seq_lens, max_kv_len, extra, out, scalars):
        dev = q.device if isinstance(q, torch.Tensor) else None
        if dev is None or dev.type not in ("cuda", "cpu"):
            raise LayerInputError(f"{self.layer.name}: q must be a CUDA tensor (the kernels) or a CPU tensor "
                                  f"(the reference evaluator)")
        if isinstance(q, torch.Tensor) and q.dim() == 3 and (q.shape[1] != self.hq or q.shape[2] != self.d):
            raise LayerInputError(f"{self.layer.name}: q must be [T, {self.hq}, {self.d}] (Hq heads of dim D), "
                                  f"got {tuple(q.shape)}")
        self._check("q", q, self.dtype, (None, self.hq, self.d), 3, dev)
        self._check("k_cache", k_cache, self.dtype, (None, self.page_size, self.hkv, self.d), 4, dev)
        if k_cache.shape[2] != self.hkv:
            raise LayerInputError(f"{self.layer.name}: the cache has {k_cache.shape[2]} KV heads, the block {self.hkv}")
        self._check("v_cache", v_cache, self.dtype, tuple(k_cache.shape), 4, dev)
        self._check("page_table", page_table, torch.int32, None, 2, dev)
        S, max_pages = page_table.shape
        self._check("seq_lens", seq_lens, torch.int32, (S,), 1, dev)
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
        tail = tables + [sc[p.name] for p in self.scalar_params] + [dims[d] for d in self.table_dims]
        return dev, S, max_pages, out, tail

    def _splits(self, dev, ctas: int, max_kv_len: int, num_splits: int | None, tile: int = 256) -> int:
        if num_splits is not None:
            if num_splits < 1:
                raise ValueError(f"num_splits must be >= 1, got {num_splits}")
            return num_splits
        sms = self._sms[dev.index]
        if ctas >= sms:
            return 1
        return max(1, min(math.ceil(2 * sms / ctas), math.ceil(max_kv_len / tile), 64))

    def _workspace(self, dev, T: int, num_splits: int):
        if num_splits == 1:
            return None, None
        return (torch.empty((T * self.hq * num_splits * self.d,), dtype=torch.float32, device=dev),
                torch.empty((T * self.hq * num_splits,), dtype=torch.float32, device=dev))

    def __call__(self, q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, *, max_kv_len: int,
                 extra: dict[str, torch.Tensor] | None = None, num_splits: int | None = None,
                 out: torch.Tensor | None = None, **scalars) -> torch.Tensor:
        """Per-token form: q_seq[t], q_pos[t] give token t's sequence and position."""
        dev, S, max_pages, out, tail = self._common_checks(q, k_cache, v_cache, page_table, seq_lens, max_kv_len,
                                                           extra, out, scalars)
        T = q.shape[0]
        self._check("q_seq", q_seq, torch.int32, (T,), 1, dev)
        self._check("q_pos", q_pos, torch.int32, (T,), 1, dev)
        if T == 0:
            return out
        if dev.type == "cpu":
            ids, pos = q_seq.long(), q_pos.long()
            groups = [(int(b), (ids == b).nonzero()[:, 0]) for b in ids.unique()]
            return self._reference(q, k_cache, v_cache, page_table, seq_lens, [(b, r, pos[r]) for b, r in groups],
                                   extra, scalars, out)
        if self.kernel == "tc":
            return self._launch_tc(dev, "decode", q, k_cache, v_cache, page_table, seq_lens, None, q_seq, q_pos, out,
                                   S, max_pages, T, 1, max_kv_len, num_splits, tail)
        main, merge = self._load(dev)
        plan = self.plan
        nchunk = (self.hq // self.hkv) // plan.heads_per_cta
        ctas = T * self.hkv * nchunk
        num_splits = self._splits(dev, ctas, max_kv_len, num_splits)
        part_o, part_lse = self._workspace(dev, T, num_splits)
        args = [q, k_cache, v_cache, page_table, seq_lens, q_seq, q_pos, out, part_o, part_lse,
                max_pages, k_cache.shape[0], S, num_splits] + tail
        main.launch((ctas, num_splits), plan.warps * 32, args)
        if num_splits > 1:
            merge.launch(T * self.hq, self.d, [part_o, part_lse, out, num_splits])
        return out

    def prefill(self, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, *, max_q_len: int, max_kv_len: int,
                extra: dict[str, torch.Tensor] | None = None, num_splits: int | None = None,
                out: torch.Tensor | None = None, **scalars) -> torch.Tensor:
        """Ragged form: sequence s owns q rows cu_seqlens[s] .. cu_seqlens[s+1]-1, its last tokens.
        max_q_len bounds every sequence's new tokens (a host int, like max_kv_len)."""
        if isinstance(q, torch.Tensor) and q.device.type == "cuda" and self.kernel != "tc":
            raise LayerInputError(f"{self.layer.name}: the ragged prefill form needs the tensor-core kernels "
                                  f"(kernel='tc', sm_80 or newer)")
        dev, S, max_pages, out, tail = self._common_checks(q, k_cache, v_cache, page_table, seq_lens, max_kv_len,
                                                           extra, out, scalars)
        T = q.shape[0]
        self._check("cu_seqlens", cu_seqlens, torch.int32, (S + 1,), 1, dev)
        if max_q_len > max_kv_len:
            raise LayerInputError(f"{self.layer.name}: max_q_len {max_q_len} is more than max_kv_len {max_kv_len} "
                                  f"(the new tokens are part of the cache)")
        if T == 0 or max_q_len <= 0:
            return out
        if dev.type == "cpu":
            cu = cu_seqlens.long().tolist()
            if cu[0] != 0 or cu[-1] != T or any(a > b for a, b in zip(cu, cu[1:])):
                raise LayerInputError(f"{self.layer.name}: cu_seqlens must rise from 0 to q's {T} rows, got {cu}")
            groups = []
            for b in range(S):
                n, length = cu[b + 1] - cu[b], int(seq_lens[b])
                if n:
                    groups.append((b, torch.arange(cu[b], cu[b + 1]), torch.arange(length - n, length)))
            return self._reference(q, k_cache, v_cache, page_table, seq_lens, groups, extra, scalars, out)
        mode = "prefill" if max_q_len * (self.hq // self.hkv) > 16 else "decode"
        return self._launch_tc(dev, mode, q, k_cache, v_cache, page_table, seq_lens, cu_seqlens, None, None, out,
                               S, max_pages, S, max_q_len, max_kv_len, num_splits, tail)

    def _reference(self, q, k_cache, v_cache, page_table, seq_lens, groups, extra, scalars, out):
        """CPU tensors: the DSL's reference evaluator, one sequence at a time, over K/V gathered
        from the pages (K is stored rotated, so only q is rotated). Bad tables are errors here."""
        from ..dsl.evaluator import evaluate
        num_pages, max_pages = k_cache.shape[0], page_table.shape[1]
        sc = {**self.scalars, **scalars}
        for b, rows, pos in groups:
            if not 0 <= b < page_table.shape[0]:
                raise LayerInputError(f"{self.layer.name}: sequence {b} is not a row of the page table")
            length = int(seq_lens[b])
            if not 0 < length <= max_pages * self.page_size:
                raise LayerInputError(f"{self.layer.name}: sequence {b} has length {length}, outside "
                                      f"[1, {max_pages * self.page_size}] (the page table's capacity)")
            pages = page_table[b, : -(-length // self.page_size)].long()
            if ((pages < 0) | (pages >= num_pages)).any():
                raise LayerInputError(f"{self.layer.name}: sequence {b}'s page table points outside the cache's "
                                      f"{num_pages} pages: {pages.tolist()}")
            k = k_cache[pages].reshape(-1, self.hkv, self.d)[:length]
            v = v_cache[pages].reshape(-1, self.hkv, self.d)[:length]
            inputs = {"q": q[rows][None], "k": k[None], "v": v[None]}
            for p in self.extra:
                t = (extra or {})[p.name]
                inputs[p.name] = t[b:b + 1] if str(p.shape[0]) == "B" else t
            inputs.update({p.name: sc[p.name] for p in self.scalar_params})
            (o,) = evaluate(self.layer.function, inputs, q_positions=pos[None], kv_positions=torch.arange(length)[None],
                            k_rotated=True)
            out[rows] = o[0].to(out.dtype)
        return out

    def _launch_tc(self, dev, mode, q, k_cache, v_cache, page_table, seq_lens, cu_q, q_seq, q_pos, out, S,
                   max_pages, chunks, max_q_len, max_kv_len, num_splits, tail):
        main, merge = self._load(dev, mode)
        plan = self.tc_plan(mode)
        cfg = plan.config
        T = q.shape[0]
        row_blocks = math.ceil(max_q_len * plan.group / cfg.rows)
        num_splits = self._splits(dev, chunks * row_blocks * self.hkv, max_kv_len, num_splits, tile=4 * cfg.keys)
        part_o, part_lse = self._workspace(dev, T, num_splits)
        args = [q, k_cache, v_cache, page_table, seq_lens, cu_q, q_seq, q_pos, out, part_o, part_lse,
                max_pages, k_cache.shape[0], S, num_splits, T] + tail
        main.launch((chunks, row_blocks, self.hkv * num_splits), cfg.threads, args, shared_mem=plan.shared_bytes)
        if num_splits > 1:
            merge.launch(T * self.hq, self.d, [part_o, part_lse, out, num_splits])
        return out
