"""A decoder-only model built from a ModelSpec: generated kernels for the norms (fused with the
residual adds), activations and attention (paged KV cache), cuBLAS for the projections.

    spec = spec_from_config("config.json")                  # models/families.py
    model = DecoderModel(spec, dtype=torch.bfloat16, device="cuda")
    model.load_state_dict(canonical_state_dict(spec, tensors))
    cache = model.make_cache(num_pages=1024, max_seqs=8, max_pages_per_seq=256)
    cache.allocate(0, 7)
    logits = model.step(ids, [0] * 7, cache)                # prefill 7 tokens of sequence 0: [1, V]

A step takes the new tokens of one or more sequences (token ids [T] and each token's sequence,
grouped by sequence in sequence order for prefill) and returns the logits of each sequence's
last token (or of every token: `logits="all"`). Each layer is

    sequential:       r = x + attn(norm1(x));  out = r + mlp(norm2(r))       (Gemma-2: norms on the branch outputs too)
    parallel:         out = x + attn(norm1(x)) + mlp(norm2(x))               (GPT-NeoX, Falcon-40B)
    parallel_shared:  h = norm1(x); out = x + attn(h) + mlp(h)               (Falcon-7B)

and each residual add is fused with the norm that follows it (`add_rms_norm`: one pass returns
the normalised rows and the sum), the last one with the final norm. An MoE layer
(spec.moe_layers) has runtime/moe.MoE as its mlp: router, experts, shared expert. CPU tensors
run the same modules through the DSL's reference evaluator.

Decode-sized steps (at most 16 tokens, bf16/f16 on an sm_80+ GPU) of sequential-residual
RMSNorm models run each layer as four generated small-token products (runtime/linear.py) with
the rest of the layer fused into them: the norm in the q/k/v and gate/up products' prologues,
the gated activation in the gate/up epilogue, the residual adds in the o and down epilogues
(DecoderLayer.fused; `model.fused_decode = False` turns it off). A step then launches no norm,
activation or add kernels.

A tensor-parallel rank (models/parallel.py) is a DecoderModel of its shard's spec with three
hooks set: DecoderLayer.reduce (the all-reduce after the o and down products, before the fused
residual add + norm), DecoderLayer.adds_residual (one rank adds the residual stream in the fused
products' epilogues) and DecoderModel.gather_vocab (the LM head's vocabulary slices joined).
A pipeline stage runs run_layers() on what the stage before sent and head() on the last stage.

kv_dtype="fp8_e4m3" stores the paged cache as e4m3 with float32 scales per layer
(kv_scales="per_tensor" or "per_head"; runtime/kv_cache.py): make_cache() builds such a cache,
whose scales start at 1.0 (calibrate with cache.set_scales(layer, k_scale, v_scale)), and
every layer's attention reads it with that layer's scales.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..codegen.gemv import GATED as GEMV_GATED
from ..dsl.program import Program
from ..runtime.attention import PagedAttention
from ..runtime.embedding import Embedding, PromptTuningEmbedding
from ..runtime.linear import KERNEL_MAX_ROWS, device_major, gemm_route, gemv
from ..runtime.kv_cache import PagedKVCache
from ..runtime.layers import LayerModule, _dtype_name
from ..runtime.moe import MoE
from .spec import AttentionSpec, ModelSpec

__all__ = ["DecoderModel", "StepContext"]

# After fused layers, the LM head of at most this many rows runs the small-token product with the
# final norm in its prologue (H200, Llama-3-8B head: 240.9 us against 252.7 for the norm kernel +
# cuBLAS at 1 token, 247.2 / 254.3 at 8; at 16 the fused norm costs more than it saves: 310.7 / 257.0)
HEAD_FUSED_ROWS = 8

_NORMS = {"rms": ("rms_norm", "add_rms_norm"), "rms_1p": ("gemma_rms_norm", "add_gemma_rms_norm"),
          "layer": ("layer_norm", "add_layer_norm")}
_GATED = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu_tanh"}
_PLAIN = {"silu": "silu_act", "gelu": "gelu_act", "gelu_tanh": "gelu_tanh_act", "relu": "relu_act"}


class Norm(torch.nn.Module):
    """A norm's weight (and bias) and its two kernels: norm(x), and add_norm(x, res) ->
    (norm(x + res), x + res). The kernels are not submodules: the weights are this module's."""

    def __init__(self, kind: str, size: int, eps: float, *, bias: bool, program: Program, dtype: str, device=None):
        super().__init__()
        plain, fused = _NORMS[kind]
        tdtype = _torch_dtype(dtype)
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=tdtype, device=device), requires_grad=False)
        if kind == "rms_1p":
            torch.nn.init.zeros_(self.weight)
        self.bias = (torch.nn.Parameter(torch.zeros(size, dtype=tdtype, device=device), requires_grad=False)
                     if kind == "layer" else None)
        if kind == "layer" and not bias:
            plain, fused = "layer_norm_nobias", None
        self.eps = float(eps)
        self.kind = kind
        self._kernels = (LayerModule(program.specialise(plain, H=size, dtype=dtype), eps=self.eps),
                         LayerModule(program.specialise(fused, H=size, dtype=dtype), eps=self.eps) if fused else None)

    @property
    def prologue(self) -> dict[str, Any]:
        """This RMSNorm as a product's prologue (runtime/linear.gemv's norm, norm_offset keywords):
        Gemma's scale is 1 + w."""
        return {"norm": (self.weight, self.eps), "norm_offset": 1.0 if self.kind == "rms_1p" else 0.0}

    def _tensors(self, **inputs) -> dict[str, torch.Tensor]:
        inputs["w"] = self.weight
        if self.bias is not None:
            inputs["b"] = self.bias
        return inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (y,) = _as_tuple(self._kernels[0]._forward_bound(self._tensors(x=x), {"eps": self.eps}, None))
        return y

    def add(self, x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + res), x + res) in one pass."""
        if self._kernels[1] is None:
            s = x + res
            return self(s), s
        y, s = self._kernels[1]._forward_bound(self._tensors(x=x, res=res), {"eps": self.eps}, None)
        return y, s


def _product(lin: torch.nn.Module, x: torch.Tensor, **epilogue) -> torch.Tensor:
    """A projection with the fused prologue/epilogue (runtime/linear.gemv's keywords): a float
    Linear's weight through gemv; a quantised one (runtime/quant.QuantLinear) through its own."""
    if isinstance(lin, torch.nn.Linear):
        return gemv(x, lin.weight, lin.bias, **epilogue)
    return lin(x, **epilogue)


def _on_gemm(lin: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether a float projection of a longer step (past the small-token rows) runs on the
    generated Hopper GEMM through gemv, its epilogue fused: where runtime/linear.gemm_route sends
    it (off by default)."""
    return (isinstance(lin, torch.nn.Linear) and x.dim() == 2 and x.shape[0] > KERNEL_MAX_ROWS
            and gemm_route(x, lin.weight))


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@dataclass
class StepContext:
    """What every layer's attention needs for one step: where its K/V go and how to attend.

    Eager steps come from PagedKVCache.begin_step (host bookkeeping, uploaded once); a captured
    decode step (models/graphs.py) computes `meta` (pages, positions) on the device."""
    cache: PagedKVCache
    q_seq: torch.Tensor          # int32 [T]: each token's sequence, on the device
    q_pos: torch.Tensor          # int32 [T]: each token's position
    max_kv_len: int              # a bound on every sequence's length (the split-KV heuristic)
    step: Any = None             # eager: the cache's planned step
    meta: torch.Tensor | None = None   # captured: int32 [2T] pages then positions, on the device
    cu_seqlens: torch.Tensor | None = None   # prefill form: int32 [max_seqs + 1]
    max_q_len: int = 1
    long_rope: bool | None = None   # LongRoPE's factors for the step (True: long); None: by max_kv_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, rope) -> None:
        if self.meta is not None:
            self.cache.write_device(layer, k, v, rope, self.meta)
        else:
            self.cache.write(self.step, layer, k, v, rope)

    def attend(self, attn: PagedAttention, layer: int, q: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.cache.layer(layer)
        pt, lens = self.cache._page_table, self.cache._seq_lens
        scales = {}
        if self.cache.kv_dtype:   # views of the layer's scales: nothing read on the host (capturable)
            scales = dict(zip(("k_scale", "v_scale"), self.cache.layer_scales(layer)))
        if self.cu_seqlens is not None and (q.device.type != "cuda" or attn.kernel == "tc"):   # simt: per token
            return attn.prefill(q, k_cache, v_cache, pt, lens, self.cu_seqlens, max_q_len=self.max_q_len,
                                max_kv_len=self.max_kv_len, **scales)
        return attn(q, k_cache, v_cache, pt, lens, self.q_seq, self.q_pos, max_kv_len=self.max_kv_len, **scales)


class Attention(torch.nn.Module):
    """A decoder layer's attention: the q/k/v product, (Qwen3) the q / k norms, K / V appended to the paged cache
    (K rotated there), the paged kernel, the output product. `long`: a LongRoPE block without a fixed regime
    (Phi-3's long-context models) as (original_max_position, the long factors' PagedAttention, their RopeSpec):
    a step whose largest position + 1 is past original_max_position takes those, as transformers does
    (its inv_freq switches to the long factors once the sequence length passes it); ctx.long_rope, where set,
    chooses instead (models/engine.py: by each sequence's whole length, running a sequence that crosses over
    again from its start, as transformers' Phi-3 generation does)."""

    def __init__(self, spec: ModelSpec, index: int, attn: PagedAttention, rope, *, program: Program, dtype: str,
                 device=None, long: tuple | None = None):
        super().__init__()
        self.index = index
        self.hq, self.hkv, self.d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        td = _torch_dtype(dtype)
        self.qkv = torch.nn.Linear(spec.hidden_size, spec.qkv_size, bias=spec.qkv_bias, dtype=td, device=device)
        self.o = torch.nn.Linear(self.hq * self.d, spec.hidden_size, bias=spec.o_bias, dtype=td, device=device)
        if spec.qk_norm:   # Qwen3's RMSNorm of each head, Gemma 3's (1 + w) one
            kind = spec.qk_norm_kind
            self.q_norm = Norm(kind, self.d, spec.norm_eps, bias=False, program=program, dtype=dtype, device=device)
            self.k_norm = Norm(kind, self.d, spec.norm_eps, bias=False, program=program, dtype=dtype, device=device)
        else:
            self.q_norm = self.k_norm = None
        self.attn = attn
        self.rope = rope
        self.long = long
        self.splits = (self.hq * self.d, self.hkv * self.d, self.hkv * self.d)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        o = self._attend(_product(self.qkv, x) if _on_gemm(self.qkv, x) else self.qkv(x), ctx)
        return _product(self.o, o) if _on_gemm(self.o, o) else self.o(o)

    def fused(self, x: torch.Tensor, ctx: StepContext, prologue: dict, residual: bool = True) -> torch.Tensor:
        """x + o(attention(qkv(norm(x)))) with the norm in the q/k/v product's prologue (Norm.prologue)
        and the residual add in the output product's epilogue (the small-token kernel: runtime/linear.py);
        without the add when not `residual` (a tensor-parallel rank other than the one that adds it)."""
        qkv = _product(self.qkv, x, **prologue)
        return _product(self.o, self._attend(qkv, ctx), **({"residual": x} if residual else {}))

    def _attend(self, qkv: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        T = qkv.shape[0]
        q, k, v = qkv.split(self.splits, dim=-1)
        if self.q_norm is not None:   # Qwen3: RMSNorm of each head (before RoPE)
            q = self.q_norm(q.reshape(T * self.hq, self.d))
            k = self.k_norm(k.reshape(T * self.hkv, self.d))
        attn, rope = self.attn, self.rope
        if self.long is not None and (ctx.max_kv_len > self.long[0] if ctx.long_rope is None else ctx.long_rope):
            _, attn, rope = self.long   # LongRoPE: the step is past the short range
        # k and v may stay strided views of the fused output (the append takes token strides)
        ctx.write(self.index, k.view(T, self.hkv, self.d), v.view(T, self.hkv, self.d), rope)
        o = ctx.attend(attn, self.index, q.contiguous().view(T, self.hq, self.d))
        return o.view(T, self.hq * self.d)


class MLP(torch.nn.Module):
    def __init__(self, spec: ModelSpec, *, program: Program, dtype: str, device=None):
        super().__init__()
        td = _torch_dtype(dtype)
        H, Fd = spec.hidden_size, spec.intermediate_size
        if spec.gated:
            if spec.activation not in _GATED:
                raise ValueError(f"no gated kernel for activation '{spec.activation}'")
            self.gate_up = torch.nn.Linear(H, 2 * Fd, bias=spec.mlp_bias, dtype=td, device=device)
            self.act = LayerModule(program.specialise(_GATED[spec.activation], F=Fd, dtype=dtype))
        else:
            self.up = torch.nn.Linear(H, Fd, bias=spec.mlp_bias, dtype=td, device=device)
            self.act = LayerModule(program.specialise(_PLAIN[spec.activation], F=Fd, dtype=dtype))
        self.down = torch.nn.Linear(Fd, H, bias=spec.mlp_bias, dtype=td, device=device)
        self.gated = spec.gated
        self.activation = spec.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated and self.activation in GEMV_GATED and _on_gemm(self.gate_up, x):
            h = _product(self.gate_up, x, gated=self.activation)
        else:
            h = self.act(self.gate_up(x) if self.gated else self.up(x))
        return _product(self.down, h) if _on_gemm(self.down, h) else self.down(h)

    def fused(self, r: torch.Tensor, prologue: dict, residual: bool = True) -> torch.Tensor:
        """r + mlp(norm(r)): the norm in the first product's prologue (Norm.prologue), the gated
        activation in its epilogue, the residual add in the down product's epilogue (none when not
        `residual`, as Attention.fused)."""
        if self.gated:
            h = _product(self.gate_up, r, gated=self.activation, **prologue)
        else:
            h = self.act(_product(self.up, r, **prologue))
        return _product(self.down, h, **({"residual": r} if residual else {}))


class DecoderLayer(torch.nn.Module):
    """attention: the layer's attention module, forward(x [T, H], ctx) -> [T, H] (Attention, or
    another kind with its own step context: models/deepseek.py's MLA)."""

    def __init__(self, spec: ModelSpec, index: int, attention: torch.nn.Module, *, program: Program, dtype: str,
                 device=None):
        super().__init__()
        norm = dict(bias=spec.norm_bias, program=program, dtype=dtype, device=device)
        H, eps = spec.hidden_size, spec.norm_eps
        self.residual = spec.residual
        self.attn_norm = Norm(spec.norm, H, eps, **norm)
        self.attn = attention
        self.post_attn_norm = Norm(spec.norm, H, eps, **norm) if spec.sandwich_norms else None
        self.mlp_norm = Norm(spec.norm, H, eps, **norm) if spec.residual != "parallel_shared" else None
        self.mlp = (MoE(spec.moe, dtype=dtype, device=device, program=program) if spec.is_moe(index) else
                    MLP(spec, program=program, dtype=dtype, device=device))
        self.post_mlp_norm = Norm(spec.norm, H, eps, **norm) if spec.sandwich_norms else None
        # tensor parallelism (models/parallel.py sets these): `reduce` sums a branch output over the
        # ranks (runtime/parallel.ParallelGroup.all_reduce), right after the o and down products and
        # before the residual add + norm that follows (one fused kernel, as on one rank); None on one
        # rank. In the fused layer only the rank with `adds_residual` adds the residual stream in the
        # products' epilogues, so that the sum holds it once.
        self.reduce = None
        self.adds_residual = True

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.reduce is None else self.reduce(x)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's branch output (or the embeddings, residual None); returns
        (this layer's branch output, the residual stream before it is added)."""
        h, residual = (self.attn_norm(x), x) if residual is None else self.attn_norm.add(x, residual)
        a = self.attn(h, ctx)
        if self.residual == "sequential":
            a = self._sum(a)
            if self.post_attn_norm is not None:
                a = self.post_attn_norm(a)
            h, residual = self.mlp_norm.add(a, residual)
            m = self._sum(self.mlp(h))
            if self.post_mlp_norm is not None:
                m = self.post_mlp_norm(m)
            return m, residual
        # parallel: both branches read the same input; transformers adds (mlp + attn) + x
        m = self.mlp(h if self.mlp_norm is None else self.mlp_norm(residual))
        return self._sum(m + a), residual    # tensor parallel: one sum for both branches

    def fused(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """The layer on the residual stream x (sequential residual, RMSNorms): x + attn + mlp, four
        small-token products with the norms and residual adds fused in (DecoderModel.fuses)."""
        r = self._sum(self.attn.fused(x, ctx, self.attn_norm.prologue, self.adds_residual))
        return self._sum(self.mlp.fused(r, self.mlp_norm.prologue, self.adds_residual))


class LanguageModelWeights:
    """What a language model's embedding and head say of it (its modules `embed` and `lm_head`, None where the head
    is tied to the embedding): the dtype, the device and the head's weight."""

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight


class DecoderModel(LanguageModelWeights, torch.nn.Module):
    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype | str = torch.bfloat16, device=None,
                 page_size: int = 16, program: Program | None = None, kv_dtype: str | None = None,
                 kv_scales: str = "per_tensor"):
        super().__init__()
        self.spec = spec
        self.page_size = page_size
        self.kv_dtype, self.kv_scales = kv_dtype, kv_scales   # the cache make_cache() builds
        dname = _dtype_name(dtype)
        td = _torch_dtype(dname)
        prog = program or Program.stdlib()
        H = spec.hidden_size
        # the generated gather kernels (runtime/embedding.py); `weight` as torch.nn.Embedding's
        self.embed = Embedding(spec.vocab_size, H, dname, device=device, program=prog)
        self.pos_embed = (Embedding(spec.max_positions, H, dname, device=device, program=prog)
                          if spec.positions == "learned" else None)
        self._prompt_tuning: PromptTuningEmbedding | None = None
        self._program = prog
        norm = dict(bias=spec.norm_bias, program=prog, dtype=dname, device=device)
        self.embed_norm = Norm(spec.norm, H, spec.norm_eps, **norm) if spec.embed_norm else None
        # one attention module (kernels) per distinct attention spec, shared by the layers that have it
        self._attention: dict[AttentionSpec, tuple[PagedAttention, Any]] = {}
        self.layers = torch.nn.ModuleList(
            DecoderLayer(spec, i, self._make_attention(i, prog, dname, device), program=prog, dtype=dname,
                         device=device) for i in range(spec.num_layers))
        self.final_norm = Norm(spec.norm, H, spec.norm_eps, **norm)
        self.lm_head = (None if spec.tie_word_embeddings else
                        torch.nn.Linear(H, spec.vocab_size, bias=spec.lm_head_bias, dtype=td, device=device))
        self._embed_scale = spec.embed_scale
        self.fused_decode = True   # decode steps on the fused small-token products where they serve (fuses())
        # tensor parallelism (models/parallel.py): the LM head holds this rank's vocabulary rows and
        # gather_vocab (runtime/parallel.ParallelGroup.all_gather) joins the ranks' logits; None on one rank
        self.gather_vocab = None

    def _make_attention(self, index: int, prog: Program, dname: str, device) -> torch.nn.Module:
        """Layer `index`'s attention module (a subclass with another kind of attention and cache
        overrides this, make_cache and context)."""
        attn, rope, long = self._attention_for(self.spec.attention[index], prog, dname)
        return Attention(self.spec, index, attn, rope, program=prog, dtype=dname, device=device, long=long)

    def _attention_for(self, aspec: AttentionSpec, prog: Program, dname: str):
        """(PagedAttention, RopeSpec, long) of an attention spec, built once: `long` is None, or for a LongRoPE
        block without a fixed regime (original_max_position, PagedAttention, RopeSpec) of its long factors (the
        first two then of its short ones): each a block with one constant frequency table."""
        hit = self._attention.get(aspec)
        if hit is None:
            s = self.spec
            kw = dict(aspec.consts)
            if aspec.rope_scaling is not None:
                params, max_pos = aspec.rope_scaling
                kw["rope_scaling"] = (dict(params), max_pos)
            threshold = aspec.longrope_threshold()
            built = []
            for regime in (None,) if threshold is None else ("short", "long"):
                layer = prog.specialise(aspec.definition, Hq=s.num_heads, Hkv=s.num_kv_heads, D=s.head_dim,
                                        dtype=dname, **kw, **({} if regime is None else {"rope_regime": regime}))
                built.append((PagedAttention(layer, page_size=self.page_size, kv_dtype=self.kv_dtype),
                              layer.function.outputs[0].arg.rope))
            long = None if threshold is None else (threshold, *built[1])
            hit = self._attention[aspec] = (*built[0], long)
        return hit

    # ---- cache --------------------------------------------------------------------------
    def make_cache(self, *, num_pages: int, max_seqs: int, max_pages_per_seq: int) -> PagedKVCache:
        s = self.spec
        return PagedKVCache(num_pages, self.page_size, s.num_kv_heads, s.head_dim, dtype=self.dtype,
                            device=self.device, max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq,
                            num_layers=s.num_layers, kv_dtype=self.kv_dtype, scales=self.kv_scales)

    def context(self, cache: PagedKVCache, seq_ids: list[int]) -> StepContext:
        """Plan a step of tokens (host bookkeeping) for every layer: prefill form when tokens of
        a sequence come several at a time, grouped by sequence in order; per-token otherwise."""
        step = cache.begin_step(seq_ids)
        q_seq, q_pos = cache.last_tokens
        T = len(seq_ids)
        max_kv_len = int(step.positions.max()) + 1 if T else 0
        ctx = StepContext(cache, q_seq, q_pos, max_kv_len, step=step)
        ids = [int(i) for i in seq_ids]
        if len(set(ids)) < T and all(a <= b for a, b in zip(ids, ids[1:])):
            counts = np.bincount(np.asarray(ids), minlength=cache.max_seqs)
            ctx.cu_seqlens = torch.tensor([0, *itertools.accumulate(counts.tolist())], dtype=torch.int32,
                                          device=cache.device)
            ctx.max_q_len = int(counts.max())
        return ctx

    # ---- forward ------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor | None, prompt_table=None,
                     tasks=None) -> torch.Tensor:
        if prompt_table is None:
            x = self.embed(tokens)
        else:   # ids >= vocab_size are virtual tokens: rows of their task's prompt table
            x = self.prompt_tuning(tokens, prompt_table, 0 if tasks is None else tasks)
        if self._embed_scale is not None:   # Gemma: scaled in the model's dtype, as transformers does
            x = x * torch.tensor(self._embed_scale, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x

    def prompt_tuning(self, tokens, prompt_table, tasks) -> torch.Tensor:
        """TensorRT-LLM's PromptTuningEmbedding over this model's embedding weight."""
        if self._prompt_tuning is None:
            pt = PromptTuningEmbedding(self.spec.vocab_size, self.spec.hidden_size, self.dtype, device="meta",
                                       program=self._program)
            pt._parameters["weight"] = self.embed.weight     # shared, not a copy (nor a submodule)
            self._prompt_tuning = pt
        return self._prompt_tuning(tokens, prompt_table, tasks)

    def hidden(self, tokens: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None, *,
               prompt_table=None, tasks=None) -> torch.Tensor:
        """The final-norm hidden states of `rows` (all tokens when None) after a step's layers."""
        return self._final_norm(*self._layers(tokens, ctx, rows, prompt_table, tasks))

    def _final_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.final_norm(x) if residual is None else self.final_norm.add(x, residual)[0]

    def _layers(self, tokens, ctx, rows, prompt_table, tasks) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's layers: (the residual stream, None) from the fused layers, else (the last
        branch output, the residual stream before it is added); `rows` of them."""
        if self.pos_embed is not None and ctx.step is not None and ctx.max_kv_len > self.spec.max_positions:
            raise ValueError(f"{self.spec.model_type}: position {ctx.max_kv_len - 1} is past the model's "
                             f"{self.spec.max_positions} learned positions")
        x = self.embed_tokens(tokens, ctx.q_pos, prompt_table, tasks)
        x, residual = self.run_layers(x, None, ctx)
        if rows is not None:
            x, residual = x[rows], (None if residual is None else residual[rows])
        return x, residual

    def run_layers(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder layers over x: the embeddings (residual None), or a previous pipeline
        stage's output (models/parallel.py). Fused layers (fuses(); residual None in and out) or
        the unfused ones, returning (the last branch output, the residual stream before it)."""
        if residual is None and self.fuses(x):
            for layer in self.layers:
                x = layer.fused(x, ctx)
            return x, None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx)
        return x, residual

    def step_logits(self, tokens: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None = None, *,
                    prompt_table=None, tasks=None) -> torch.Tensor:
        """logits(hidden(...)); after fused layers, at most HEAD_FUSED_ROWS rows go through the
        small-token product with the final norm in its prologue (no norm kernel)."""
        return self.head(*self._layers(tokens, ctx, rows, prompt_table, tasks))

    def head(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The logits of the layers' output (as run_layers returns it): the final norm and the LM
        head, in one small-token product for at most HEAD_FUSED_ROWS rows after fused layers."""
        if residual is None and x.shape[0] <= HEAD_FUSED_ROWS:
            return self._softcap(self._vocab(gemv(x, self.head_weight(),
                                                  None if self.lm_head is None else self.lm_head.bias,
                                                  **self.final_norm.prologue)))
        return self.logits(self._final_norm(x, residual))

    @torch.no_grad()
    def quantize_(self, wtype: str = "u4", group_size: int = 128) -> "DecoderModel":
        """Quantise the decoder layers' projections in place (round to nearest: runtime/quant.py
        QuantLinear.from_float; u4 per group, i8 per row or group, f8e4m3 per row or 128 x 128
        block): decode steps then run the quantised small-token products. The embeddings, the
        LM head and MoE layers (router, experts, shared expert) stay in the model's dtype.
        Returns the model."""
        from ..runtime.quant import QuantLinear
        td = self.dtype if self.dtype in (torch.bfloat16, torch.float16) else torch.float16
        for layer in self.layers:
            for owner, attr in ((layer.attn, "qkv"), (layer.attn, "o"), (layer.mlp, "gate_up"), (layer.mlp, "up"),
                                (layer.mlp, "down")):
                lin = getattr(owner, attr, None)
                if isinstance(lin, torch.nn.Linear):
                    q = QuantLinear.from_float(lin.weight.detach(), group_size, lin.bias, wtype=wtype, dtype=td)
                    setattr(owner, attr, q.to(lin.weight.device))
        return self

    def fuses(self, x: torch.Tensor) -> bool:
        """Whether a step over x (the embeddings, [T, H]) runs the layers as small-token products
        with the norms and residual adds fused in (DecoderLayer.fused): decode-sized steps (at
        most 16 tokens) in bf16/f16 on an sm_80+ GPU, of a model with sequential residuals and
        RMSNorms (no sandwich norms) and no MoE layers, unless `fused_decode` is turned off. Same
        meaning either way; the fused step rounds once per product where the unfused one rounds
        after the norm too."""
        s = self.spec
        return (self.fused_decode and x.is_cuda and s.moe is None and x.dtype in (torch.bfloat16, torch.float16)
                and 1 <= x.shape[0] <= KERNEL_MAX_ROWS and s.residual == "sequential" and not s.sandwich_norms
                and s.norm in ("rms", "rms_1p") and not torch.compiler.is_compiling()
                and (not s.gated or s.activation in GEMV_GATED)
                and all(n % 8 == 0 for n in (s.hidden_size, s.num_heads * s.head_dim, s.intermediate_size))
                and device_major(x.device) >= 8)

    def longrope_threshold(self) -> float | None:
        """A LongRoPE model's original_max_position (its attention's long factors past it), else None."""
        return min((layer.attn.long[0] for layer in self.layers if getattr(layer.attn, "long", None) is not None),
                   default=None)

    def capturable(self, tokens: int) -> bool:
        """Whether a step of `tokens` tokens reads nothing back to the host, so that a CUDA graph
        can capture it (models/graphs.py): every dense model; MoE layers where their step does
        (runtime/moe.MoE.capturable: the expert kernels or the grouped GEMM; their torch path
        reads each expert's row count)."""
        if any(getattr(layer.attn, "long", None) is not None for layer in self.layers):
            return False   # LongRoPE: the step's regime is the host's choice by its largest position (eager)
        return all(layer.mlp.capturable(tokens) for layer in self.layers if isinstance(layer.mlp, MoE))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._softcap(self._vocab(F.linear(h, self.head_weight(),
                                                  None if self.lm_head is None else self.lm_head.bias)))

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.gather_vocab is None else self.gather_vocab(logits)

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.spec.final_logit_softcap
        if cap:   # Gemma-2, as transformers: in the logits' dtype
            logits = torch.tanh(logits / cap) * cap
        if self.spec.logit_divisor:   # Granite, as transformers
            logits = logits / self.spec.logit_divisor
        return logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, seq_ids, cache: PagedKVCache, *, logits: str = "last",
             prompt_table: torch.Tensor | None = None, tasks: torch.Tensor | int | None = None,
             long_rope: bool | None = None) -> torch.Tensor:
        """Run one step: tokens [T] (ids on the model's device), seq_ids [T] (host ints; for prefill
        grouped by sequence in order). Returns the logits of each sequence's last token of the step,
        in order of appearance ([num_seqs, V]), or of every token (`logits="all"`, [T, V]).
        prompt_table ([NT, NV, H]) and tasks (each token's task, or one for all): prompt tuning,
        token ids >= vocab_size are virtual tokens of their task (PromptTuningEmbedding).
        long_rope: a LongRoPE model's factors for the step (True: long, False: short; None: long where the
        step's largest position + 1 passes original_max_position; models/engine.py decides by each
        sequence's whole length)."""
        ids = [int(i) for i in seq_ids]
        if tokens.shape != (len(ids),):
            raise ValueError(f"step: tokens must have shape [{len(ids)}] (one per seq_ids entry), "
                             f"got {list(tokens.shape)}")
        ctx = self.context(cache, ids)
        ctx.long_rope = long_rope
        rows = None
        if logits == "last":
            last = {s: t for t, s in enumerate(ids)}
            rows = torch.tensor(list(last.values()), dtype=torch.long, device=tokens.device)
        elif logits != "all":
            raise ValueError(f"step: logits must be 'last' or 'all', got {logits!r}")
        return self.step_logits(tokens, ctx, rows, prompt_table=prompt_table, tasks=tasks)

    def generate(self, prompts, *, max_new_tokens: int, **kwargs) -> list[list[int]]:
        """New tokens for each prompt (lists of token ids, or a [B, S] tensor), generated together:
        greedy, or sampled with do_sample=True, temperature, top_k, top_p, seed; stop_tokens
        end a sequence (models/engine.py generate)."""
        from .engine import generate
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        return generate(self, prompts, max_new_tokens=max_new_tokens, **kwargs)

    def release_engine(self) -> None:
        """Free the cache and CUDA graphs that generate() keeps for its next call."""
        engine = self.__dict__.pop("_engine", None)
        if engine is not None:
            for slot in list(engine.seqs):
                engine.release(slot)
            engine.graphs = None

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of a batch of prompts [B, S] (no cache kept): [B, S, V]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        B, S = input_ids.shape
        pages = -(-S // self.page_size)
        cache = self.make_cache(num_pages=max(1, B * pages), max_seqs=B, max_pages_per_seq=max(1, pages))
        for b in range(B):
            cache.allocate(b, S)
        out = self.step(input_ids.reshape(-1).to(self.device), [b for b in range(B) for _ in range(S)], cache,
                        logits="all")
        return out.view(B, S, out.shape[-1])   # a pipeline stage before the last: no logits, [B, S, 0]


def _torch_dtype(name: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[name]
