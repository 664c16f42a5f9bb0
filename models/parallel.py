"""DecoderModels split over several processes: tensor parallelism (each layer's heads and MLP
features split over tp_size ranks) and pipeline parallelism (the layers split into pp_size
stages), through torch.distributed (runtime/parallel.py's groups).

    # torchrun --nproc-per-node 2 serve.py
    model = lf.from_pretrained(folder, dtype=torch.bfloat16, device="cuda", tp_size=2)
    model.generate([[128000, 9906]], max_new_tokens=32)    # every rank runs it: same tokens on each

Every rank is a DecoderModel of its own spec (rank_spec: its q heads, KV heads and MLP
features; a pipeline stage's layers), so its kernels are specialised for its shard, loaded with
its part of the full checkpoint (shard_state_dict, stage_state_dict), with the communication
hooked in (models/model.py's hooks):
- attention: rank r holds q heads [r Hq/n, (r+1) Hq/n) and their KV heads (split when Hkv >= n,
  else the one KV head its q heads read, replicated over n / Hkv ranks), its own paged cache of
  those KV heads; the q/k/v product is column-split, the o product row-split;
- MLP: gate/up column-split (each rank's gate slice then its up slice), down row-split;
- the o and down products' partial sums are all-reduced (DecoderLayer.reduce) right before the
  residual add + norm kernel that follows them, as on one rank; in the fused decode layer only
  rank 0's product epilogues add the residual stream. Row-split biases live on rank 0 only;
- embedding and LM head: vocabulary rows split (runtime/parallel.VocabParallelEmbedding; the
  head's logit slices all-gathered: DecoderModel.gather_vocab), so logits are whole and
  identical on every rank.

A pipeline stage (PipelineStage) runs its layers on activations received from the stage before
(torch.distributed send/recv of the hidden states and residual stream), in micro-batches of at
most micro_batch_tokens tokens so that stages overlap on long prefills; the last stage makes
the logits. In generation the sampled tokens are drawn once (on the last stage's first rank)
and broadcast (shared_tokens), so every rank feeds the same tokens. Every rank must run the
same calls (steps, generate) with the same arguments: the host bookkeeping of each rank's
cache is the same.

On GPUs, decode steps of a tensor-parallel model replay CUDA graphs as on one GPU, its NCCL calls
captured with the step (models/graphs.py); pipeline stages run their steps eagerly (capturable()
is False: the send/recv between stages are the host's).

- MoE layers (mixtral, qwen2_moe, qwen3_moe): every rank keeps every expert, with its slice of
  each expert's intermediate size F (gate and up rows [r F/n, (r+1) F/n), down columns the same;
  the shared expert's F split so too, slice by slice where it is stored in slices of the routed
  experts' size); the router and the shared expert's gate are replicated, so routing is the same
  on every rank and its routed + shared output a partial sum, summed by the same DecoderLayer.reduce
  as the dense MLP's. Each rank's MoEConfig has F/n (its expert kernels specialised for it).

from_pretrained(tp_size=..., pp_size=...) reads each rank's part straight from the safetensors
files (models/loading.read_rank_state_dict: the slices shard_plan names, per canonical tensor).

ALiBi attention: each rank's block takes its heads' slopes among all the model's (the stdlib blocks'
alibi_heads / alibi_first).

Not served (a ShardError says so): tensor parallelism of MoE layers whose F/n is not a multiple of 8 (the expert
products' K), of quantised MoE experts (pipeline stages serve them), of GPTQ act-order projections along K
(o, down: their columns are stored sorted by group) and of K splits not at whole groups; latent attention
(DeepSeek) and state-space models in either form. A quantised checkpoint is read whole by every rank, each
projection made the kernel's layout, and the rank's rows (q/k/v, gate/up) or whole groups of columns (o, down)
kept.
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..runtime.layers import _dtype_name
from ..runtime.parallel import (SINGLE, Layout, ParallelGroup, ShardError, VocabParallelEmbedding, kv_head_range,
                                split_size)
from .model import DecoderModel
from .spec import ModelSpec

__all__ = ["parallel_model", "PipelineStage", "check_parallel", "rank_spec", "shard_plan", "apply_shard_plan",
           "shard_state_dict", "stage_layers", "stage_state_dict", "build_rank_pack"]

# Steps of more tokens than this go through a pipeline's stages in micro-batches of this many
MICRO_BATCH_TOKENS = 1024


def check_parallel(spec: Any, tp_size: int, pp_size: int) -> None:
    """A ShardError when the model cannot be split so: a size that does not divide, a feature
    whose split is not served."""
    if not isinstance(spec, ModelSpec) or spec.mla is not None:
        kind = getattr(spec, "model_type", type(spec).__name__)
        if tp_size * pp_size > 1:
            raise ShardError(f"{kind}: tensor and pipeline parallelism are served for DecoderModel families only "
                             f"(not latent attention or state-space models)")
        return
    if not 1 <= pp_size <= spec.num_layers:
        raise ShardError(f"pp_size {pp_size}: the model has {spec.num_layers} layers (at least one a stage)")
    if tp_size == 1:
        return
    kv_head_range(spec.num_heads, spec.num_kv_heads, 0, tp_size)
    if not (spec.moe_layers and all(spec.moe_layers)):   # some dense MLP layers
        split_size(spec.intermediate_size, tp_size, "MLP intermediate size")
    if spec.moe is not None:
        m = spec.moe
        for size, what in ((m.inter, "MoE expert intermediate size"),
                           (m.shared_inter, "MoE shared expert intermediate size")):
            if not size:
                continue
            local = split_size(size, tp_size, what)
            if local % 8:
                # the expert products (codegen/gemv.py's expert form, torch's grouped GEMM) take K = F/n
                # in rows of 16-byte vectors
                raise ShardError(f"{spec.model_type}: {what} {size} / {tp_size} ranks = {local} per rank, not a "
                                 f"multiple of 8 (the expert kernels' K, the down product's, must be)")
    split_size(spec.vocab_size, tp_size, "vocabulary")


def stage_layers(num_layers: int, pp_size: int, stage: int) -> range:
    """The layers of pipeline stage `stage`: contiguous, the first num_layers % pp_size stages one more."""
    if not 1 <= pp_size <= num_layers:
        raise ShardError(f"pp_size {pp_size}: the model has {num_layers} layers (at least one a stage)")
    base, extra = divmod(num_layers, pp_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


def rank_spec(spec: ModelSpec, layout: Layout) -> ModelSpec:
    """The spec of this rank's DecoderModel: its heads and MLP features, its stage's layers; the
    sharding recorded in extra["sharding"]. The vocabulary stays whole (the embedding and head
    modules hold their rows of it)."""
    tp = layout.tp
    check_parallel(spec, tp.size, layout.pp.size)
    layers = stage_layers(spec.num_layers, layout.pp.size, layout.stage)
    q, kv = kv_head_range(spec.num_heads, spec.num_kv_heads, tp.rank, tp.size)
    sharding = {**layout.describe(), "layers": [layers.start, layers.stop], "q_heads": [q.start, q.stop],
                "kv_heads": [kv.start, kv.stop], "num_layers": spec.num_layers, "num_heads": spec.num_heads,
                "num_kv_heads": spec.num_kv_heads, "intermediate_size": spec.intermediate_size}
    moe = spec.moe
    if moe is not None and tp.size > 1:
        # each rank's experts (and shared expert) hold F / n of their features; shared_slices is unchanged
        sharding.update(moe_inter=moe.inter, moe_shared_inter=moe.shared_inter)
        moe = dataclasses.replace(moe, inter=moe.inter // tp.size, shared_inter=moe.shared_inter // tp.size)
    attention = spec.attention[layers.start:layers.stop]
    if spec.positions == "alibi" and tp.size > 1:
        # ALiBi: a head's slope is its place among all the model's heads, so the rank's block says which they are
        attention = tuple(dataclasses.replace(a, consts=tuple(a.consts) + (("alibi_heads", spec.num_heads),
                                                                           ("alibi_first", q.start)))
                          for a in attention)
    return dataclasses.replace(
        spec, num_heads=len(q), num_kv_heads=len(kv), intermediate_size=spec.intermediate_size // tp.size, moe=moe,
        num_layers=len(layers), attention=attention,
        moe_layers=spec.moe_layers[layers.start:layers.stop] if spec.moe_layers else (),
        extra={**spec.extra, "sharding": sharding})


def shard_plan(spec: ModelSpec, name: str, shape: tuple[int, ...], rank: int, world: int):
    """How tensor-parallel rank `rank` of `world` takes its part of the canonical tensor `name` of
    shape `shape` (models/spec.py's names): None (whole), "rank0" (whole on rank 0, zeros
    elsewhere: a row-split product's bias, added once by the all-reduce) or (dim, ranges): the
    rank's pieces of the tensor along dim, concatenated in order. shard_state_dict applies it to
    whole tensors, models/loading.read_rank_state_dict reads just those pieces from the files.
    - q/k/v rows of its heads, o columns of its q heads;
    - dense MLP: gate/up rows (its slice of the gate part, then of the up part) or up rows, down
      columns;
    - MoE: every expert's gate/up rows and down columns likewise ([E, 2F, H] dim 1, [E, H, F] dim
      2), the shared expert's the same (its slices [S, 2F, H] / [S, H, F] each split so, or its
      fused [2 Fs, H] / [H, Fs]); router and shared-expert gate whole;
    - embedding and head: vocabulary rows."""
    if world == 1:
        return None
    leaf = name.split(".", 2)[2] if name.startswith("layers.") else name

    def split(dim: int, halves: bool = False):
        n = shape[dim]
        parts = (n // 2, n // 2) if halves else (n,)
        if halves and n % 2:
            raise ShardError(f"{name}: {n} gate/up {'rows' if dim == 0 else 'features'} are not two equal parts")
        ranges, start = [], 0
        for i, p in enumerate(parts):
            m = split_size(p, world, name if len(parts) == 1 else f"{name} part {i}")
            ranges.append(range(start + rank * m, start + (rank + 1) * m))
            start += p
        return dim, ranges

    if leaf in ("attn.qkv.weight", "attn.qkv.bias"):
        hq, hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = kv_head_range(hq, hkv, rank, world)
        k0, v0 = hq * D, (hq + hkv) * D
        return 0, [range(q.start * D, q.stop * D), range(k0 + kv.start * D, k0 + kv.stop * D),
                   range(v0 + kv.start * D, v0 + kv.stop * D)]
    if leaf == "attn.o.weight":
        q, _ = kv_head_range(spec.num_heads, spec.num_kv_heads, rank, world)
        return 1, [range(q.start * spec.head_dim, q.stop * spec.head_dim)]
    if leaf in ("attn.o.bias", "mlp.down.bias"):
        return "rank0"
    if leaf in ("mlp.gate_up.weight", "mlp.gate_up.bias", "mlp.shared_expert.gate_up.weight"):
        return split(0, halves=True)
    if leaf in ("mlp.up.weight", "mlp.up.bias", "embed.weight", "lm_head.weight", "lm_head.bias"):
        return split(0)
    if leaf in ("mlp.down.weight", "mlp.shared_expert.down.weight"):
        return split(1)
    if leaf in ("mlp.experts.gate_up_proj", "mlp.shared_expert.gate_up_proj"):
        return split(1, halves=True)
    if leaf in ("mlp.experts.down_proj", "mlp.shared_expert.down_proj"):
        return split(2)
    return None


def apply_shard_plan(t: torch.Tensor, plan) -> torch.Tensor:
    """A whole tensor's part by shard_plan's answer (rank 0's part for "rank0")."""
    if plan is None or plan == "rank0":
        return t
    dim, ranges = plan
    pieces = [t.narrow(dim, r.start, len(r)) for r in ranges]
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def shard_state_dict(spec: ModelSpec, tensors: dict[str, torch.Tensor], rank: int, world: int
                     ) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank `rank`'s part of a canonical state dict (models/spec.py's names), as
    shard_plan says: q/k/v rows of its heads, o columns of its q heads, gate/up rows and down
    columns of its features (of every expert too), vocabulary rows of the embedding and head;
    row-split biases whole on rank 0, zero elsewhere (the all-reduce adds them once); everything
    else whole."""
    if world == 1:
        return dict(tensors)
    check_parallel(spec, world, 1)
    from ..runtime.quant import QuantWeight, shard_quant
    out = {}
    for name, t in tensors.items():
        if isinstance(t, QuantWeight):   # a quantised projection, in the kernel's layout (models/loading.py)
            plan = shard_plan(spec, name, (t.n, t.k), rank, world)
            if plan == "rank0":
                raise ShardError(f"{name}: a quantised weight is not a bias")
            try:
                out[name] = t if plan is None else shard_quant(t, *plan)
            except ValueError as e:
                raise ShardError(f"{name}: {e}") from None
            continue
        if not isinstance(t, torch.Tensor):
            raise ShardError(f"{name}: a quantised MoE layer's experts are not split over tensor-parallel ranks "
                             f"(not served; pipeline stages serve them)")
        plan = shard_plan(spec, name, tuple(t.shape), rank, world)
        out[name] = (t if rank == 0 else torch.zeros_like(t)) if plan == "rank0" else apply_shard_plan(t, plan)
    return out


_FIRST = ("embed.", "pos_embed.", "embed_norm.")
_LAST = ("final_norm.", "lm_head.")


def stage_state_dict(tensors: dict[str, torch.Tensor], layers: range, *, first: bool, last: bool, tied: bool
                     ) -> dict[str, torch.Tensor]:
    """A pipeline stage's tensors: its layers' (renumbered from 0), the embeddings on the first
    stage, the final norm and head on the last (and the embedding there too when the head is tied)."""
    out = {}
    for name, t in tensors.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if int(i) in layers:
                out[f"layers.{int(i) - layers.start}.{rest}"] = t
        elif (name.startswith(_FIRST) and (first or (last and tied and name == "embed.weight"))) or \
                (name.startswith(_LAST) and last):
            out[name] = t
    return out


# ---- the rank's model ------------------------------------------------------------------------
def parallel_model(spec: ModelSpec, tensors: dict[str, torch.Tensor], layout: Layout, *,
                   dtype: torch.dtype | str = torch.bfloat16, device=None, page_size: int = 16, program=None,
                   kv_dtype: str | None = None, kv_scales: str = "per_tensor",
                   micro_batch_tokens: int = MICRO_BATCH_TOKENS, sharded: bool = False,
                   quant: dict | None = None) -> DecoderModel:
    """This rank's DecoderModel (a PipelineStage with pp_size > 1) of a canonical state dict of
    the FULL model (every rank passes the whole checkpoint; each keeps its part), or with
    sharded=True of this rank's part already (models/loading.read_rank_state_dict: its tensor-
    parallel shards, under the full model's layer numbers). quant: a quantised checkpoint's
    models/loading.quant_config (its projections QuantParts, as models/loading.split_quantized
    leaves them): each projection is made the kernel's layout first, then split."""
    tp, pp = layout.tp, layout.pp
    local = rank_spec(spec, layout)
    layers = range(*local.extra["sharding"]["layers"])
    first, last = pp.rank == 0, pp.rank == pp.size - 1
    if quant is not None:
        from .families import QuantStack
        from .loading import QuantPart, quant_dtype, quant_weight
        tensors = {name: quant_weight(name, t, quant, quant_dtype(dtype))
                   if isinstance(t, (QuantPart, list)) and not isinstance(t, QuantStack) else t
                   for name, t in tensors.items()}
    if not sharded:
        tensors = shard_state_dict(spec, tensors, tp.rank, tp.size)
    weights = stage_state_dict(tensors, layers, first=first, last=last, tied=spec.tie_word_embeddings)
    kw = dict(dtype=_dtype_name(dtype), device=device, page_size=page_size, program=program, kv_dtype=kv_dtype,
              kv_scales=kv_scales)
    model = PipelineStage(local, layout, micro_batch_tokens=micro_batch_tokens, **kw) if pp.size > 1 else \
        DecoderModel(local, **kw)
    if tp.size > 1:
        _hook_tensor_parallel(model, tp)
    if pp.size > 1 and not last:
        model.lm_head = None        # no head on this stage (head_weight() is never read here)
    if pp.size > 1 and not first and "embed.weight" not in weights:
        # no embedding lookups on this stage: its table keeps no rows (dtype and device still read)
        model.embed.weight = torch.nn.Parameter(model.embed.weight.new_empty(0, spec.hidden_size),
                                                requires_grad=False)
    if quant is not None:   # the quantised projections become QuantLinears (their buffers then loaded)
        from .loading import _quantised_modules, quant_dtype, quant_loaded
        _quantised_modules(model, weights, quant, quant_dtype(model.dtype))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if quant is not None:
        missing = quant_loaded(model, missing)
    unused = () if pp.size == 1 else ((() if first else _FIRST) + (() if last else _LAST))
    missing = [n for n in missing if not n.startswith(unused)]
    if missing or unexpected:
        raise ShardError(f"rank {layout.rank}: the sharded checkpoint "
                         f"{'lacks ' + missing[0] if missing else 'has an unexpected ' + unexpected[0]}")
    model.parallel = layout
    model.sharding = local.extra["sharding"]
    if layout.world > 1:
        model.shared_tokens = partial(_shared_tokens, layout, model.device)
    return model.eval()


def _hook_tensor_parallel(model: DecoderModel, tp: ParallelGroup) -> None:
    """The communication of a tensor-parallel rank: the layers' sums, the vocabulary-split
    embedding and head (its logit slices gathered)."""
    s = model.spec
    for layer in model.layers:
        layer.reduce = tp.all_reduce
        layer.adds_residual = tp.rank == 0
    model.embed = VocabParallelEmbedding(s.vocab_size, s.hidden_size, model.dtype, group=tp, device=model.device,
                                         program=model._program)
    if model.lm_head is not None:
        model.lm_head = torch.nn.Linear(s.hidden_size, s.vocab_size // tp.size, bias=s.lm_head_bias,
                                        dtype=model.dtype, device=model.device)
    model.gather_vocab = partial(tp.all_gather, dim=-1)


def _shared_tokens(layout: Layout, device, draw: Callable[[], torch.Tensor], n: int) -> torch.Tensor:
    """The tokens [n] drawn once, by the last stage's first rank (draw()), and broadcast to all;
    generate() calls this (models/engine.py) so that every rank feeds the same tokens."""
    src = (layout.pp.size - 1) * layout.tp.size
    if layout.rank == src:
        tokens = draw().to(device=device, dtype=torch.long).contiguous()
    else:
        tokens = torch.empty(n, dtype=torch.long, device=device)
    dist.broadcast(tokens, src=src)
    return tokens


class PipelineStage(DecoderModel):
    """One pipeline stage: a DecoderModel of its layers (rank_spec), which receives the hidden
    states and residual stream from the stage before and sends its own to the one after. step()
    returns the logits on the last stage and a [rows, 0] tensor on the others."""

    def __init__(self, spec: ModelSpec, layout: Layout, *, micro_batch_tokens: int = MICRO_BATCH_TOKENS, **kw):
        super().__init__(spec, **kw)
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be positive, got {micro_batch_tokens}")
        self.layout, self.micro_batch_tokens = layout, micro_batch_tokens
        pp = layout.pp
        self.first, self.last = pp.rank == 0, pp.rank == pp.size - 1
        self._prev = None if self.first else pp.ranks[pp.rank - 1]
        self._next = None if self.last else pp.ranks[pp.rank + 1]

    def capturable(self, tokens: int) -> bool:
        return False   # a step's send/recv are the host's: no CUDA graphs across stages

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, seq_ids, cache, *, logits: str = "last", prompt_table=None,
             tasks=None, long_rope: bool | None = None) -> torch.Tensor:
        """DecoderModel.step over the pipeline: the step's tokens in micro-batches (consecutive
        slices, each a step of its own on this stage's cache), each received, run and sent on
        (LongRoPE: every micro-batch with the factors of the whole step)."""
        if prompt_table is not None:
            raise ValueError("a pipeline stage does not serve prompt tuning")
        ids = [int(i) for i in seq_ids]
        T = len(ids)
        threshold = self.longrope_threshold()
        if long_rope is None and threshold is not None:   # the step's largest position + 1, from the host's lengths
            ends = {s: cache.seq_len(s) for s in ids}
            for s_ in ids:
                ends[s_] += 1
            long_rope = max(ends.values(), default=0) > threshold
        if tokens.shape != (T,):
            raise ValueError(f"step: tokens must have shape [{T}] (one per seq_ids entry), got {list(tokens.shape)}")
        if logits == "last":
            want = list({s: t for t, s in enumerate(ids)}.values())
        elif logits == "all":
            want = list(range(T))
        else:
            raise ValueError(f"step: logits must be 'last' or 'all', got {logits!r}")
        mb = self.micro_batch_tokens
        sends, done, outs = [], [], []
        for a in range(0, T, mb):
            b = min(T, a + mb)
            ctx = self.context(cache, ids[a:b])
            ctx.long_rope = long_rope
            if self.first:
                x, residual = self.embed_tokens(tokens[a:b], ctx.q_pos), None
            else:
                x, residual = self._recv(b - a)
            x, residual = self.run_layers(x, residual, ctx)
            if not self.last:
                sends.append(self._send(x, residual))
                continue
            rows = sorted(t for t in want if a <= t < b)
            if rows:
                sel = None if len(rows) == b - a else torch.tensor([t - a for t in rows], device=x.device)
                if sel is not None:
                    x, residual = x[sel], (None if residual is None else residual[sel])
                outs.append(self.head(x, residual))
                done += rows
        for work, _payload in sends:
            work.wait()
        if not self.last:
            return torch.empty(len(want), 0, dtype=self.dtype, device=self.device)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if done != want:
            at = {t: i for i, t in enumerate(done)}
            out = out[torch.tensor([at[t] for t in want], device=out.device)]
        return out

    def _send(self, x: torch.Tensor, residual: torch.Tensor | None):
        payload = (x if residual is None else torch.stack([x, residual])).contiguous()
        return dist.isend(payload, dst=self._next), payload   # the payload lives until the send is done

    def _recv(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        H = self.spec.hidden_size
        # the stage before fused its layers exactly when these would be (same rows, dtype, device)
        fused = self.fuses(torch.empty(n, H, dtype=self.dtype, device=self.device))
        buf = torch.empty((n, H) if fused else (2, n, H), dtype=self.dtype, device=self.device)
        dist.recv(buf, src=self._prev)
        return (buf, None) if fused else (buf[0], buf[1])


# ---- packs --------------------------------------------------------------------------------
def build_rank_pack(config, out_dir: str | os.PathLike, *, tp_size: int, tp_rank: int, dtype: str, arch: str,
                    page_size: int = 16, progress=None, **build_kw) -> dict:
    """`layerforge build` of one tensor-parallel rank: the kernels of rank_spec (its heads and
    features), the manifest recording the sharding ("sharding": tp_size, tp_rank, its heads)."""
    from ..dsl.program import Program
    from ..runtime.build import build
    from .families import bindings_from_spec, definitions_for, spec_from_config
    spec = spec_from_config(config)
    if not 0 <= tp_rank < tp_size:
        raise ShardError(f"tp_rank {tp_rank} is not a rank of tp_size {tp_size}")
    layout = Layout(tp=ParallelGroup(tp_rank, tp_size, None, tuple(range(tp_size))), pp=SINGLE, rank=tp_rank,
                    world=tp_size)
    local = rank_spec(spec, layout)
    manifest = build(Program.stdlib(), bindings_from_spec(local), dtype=dtype, arch=arch, out_dir=out_dir,
                     definitions=definitions_for(local), page_size=page_size, progress=progress, **build_kw)
    manifest["sharding"] = local.extra["sharding"]
    path = Path(out_dir) / "manifest.json"
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return manifest
