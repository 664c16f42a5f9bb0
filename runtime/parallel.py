"""Tensor parallelism over torch.distributed: the process groups, the shard arithmetic, and the
layers that split one product over the ranks of a group (NCCL on GPUs, gloo on the CPU; the
processes are started by torchrun or torch.multiprocessing, nothing here moves bytes itself).

    layout = init_parallel(tp_size=2)                  # torchrun's env; one rank per GPU
    tp = layout.tp                                      # ParallelGroup: rank, size, the torch group
    up = ColumnLinear.shard_from(w_up, group=tp)        # rows (output features) split: y's shard
    down = RowLinear.shard_from(w_down, group=tp)       # columns (input features) split, then all-reduce
    emb = VocabParallelEmbedding.shard_from(w_emb, group=tp)   # vocabulary rows split, all-reduce
    head = ParallelLMHead.shard_from(w_head, group=tp)  # vocabulary rows split, logits all-gathered
    y = down(act(up(x)))                                # one all-reduce for the pair

`shard_from` takes the FULL (Hugging Face) weight and keeps this rank's part. A size that does
not divide over the ranks is a ShardError naming it, before anything is built. Shards are
contiguous: rank r of n holds rows (or columns) [r N/n, (r+1) N/n); a fused weight of several
parts (gate then up, q then k then v) is sharded part by part (`parts=`), so each rank's
shard has the same layout as the whole.

A group of one rank (`SINGLE`, or tp_size 1) communicates nothing: the layers are then the
plain products. Every collective runs on torch's current stream (NCCL) with no host
synchronisation, so a decode step with them can be captured in a CUDA graph (models/graphs.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .embedding import Embedding
from .linear import Linear, gemv

__all__ = ["ParallelGroup", "Layout", "SINGLE", "ShardError", "init_parallel", "split_size", "shard",
           "kv_head_range", "ColumnLinear", "RowLinear", "VocabParallelEmbedding", "ParallelLMHead"]


class ShardError(ValueError):
    """A size that cannot be split over the ranks (heads, features, vocabulary), or a process
    layout that does not match the world: raised before anything is built or launched."""


# ---- groups -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelGroup:
    """This process's place in one group of ranks that share a layer's work: its rank in the
    group, the group's size, the torch.distributed group (None: the default one) and the
    global ranks of the group's members in group order."""
    rank: int = 0
    size: int = 1
    group: Any = None
    ranks: tuple[int, ...] = (0,)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group, in place (x itself returned; a copy where x is not contiguous)."""
        if self.size > 1:
            x = x.contiguous()
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x, group=self.group)
        return torch.cat(out.view(self.size, *x.shape).unbind(0), dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part (split along `dim` as shard() splits) of the sum of x over the group."""
        if self.size == 1:
            return x
        n = split_size(x.shape[dim], self.size, f"reduce_scatter: dim {dim}")
        parts = x.movedim(dim, 0).contiguous()
        out = torch.empty((n, *parts.shape[1:]), dtype=x.dtype, device=x.device)
        _reduce_scatter_single(out, parts, group=self.group)
        return out.movedim(0, dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of the group's rank `src` on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=self.ranks[src], group=self.group)
        return x


SINGLE = ParallelGroup()

# torch >= 2.10's names of the one-tensor collectives (the older ones are deprecated there)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Layout:
    """The ranks' grid: pp_size pipeline stages of tp_size tensor-parallel ranks each; global
    rank = stage * tp_size + tp rank. `tp` is this rank's tensor-parallel group, `pp` the
    group of the ranks with its tp rank in every stage (the stage is the pp group's rank)."""
    tp: ParallelGroup = SINGLE
    pp: ParallelGroup = SINGLE
    rank: int = 0
    world: int = 1

    @property
    def stage(self) -> int:
        return self.pp.rank

    def describe(self) -> dict[str, int]:
        return {"tp_size": self.tp.size, "tp_rank": self.tp.rank, "pp_size": self.pp.size, "pp_rank": self.pp.rank}


def init_parallel(tp_size: int = 1, pp_size: int = 1, *, backend: str | None = None) -> Layout:
    """The process grid of tp_size x pp_size ranks. Initialises torch.distributed from torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) where it is not yet, with NCCL where
    CUDA is available and gloo otherwise (`backend` overrides), and on CUDA makes LOCAL_RANK's
    GPU the current one. Every rank must call this with the same sizes (it creates the groups
    collectively). tp_size = pp_size = 1 without torch.distributed is the single-process layout."""
    for name, v in (("tp_size", tp_size), ("pp_size", pp_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ShardError(f"{name} must be a positive integer, got {v!r}")
    if tp_size * pp_size == 1 and not dist.is_initialized():
        return Layout()
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ShardError(f"tp_size {tp_size} x pp_size {pp_size} needs torch.distributed: start the processes "
                             f"with torchrun (the environment lacks {', '.join(missing)}), or call "
                             f"torch.distributed.init_process_group first")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size * pp_size != world:
        raise ShardError(f"tp_size {tp_size} x pp_size {pp_size} = {tp_size * pp_size} ranks, but the world has "
                         f"{world} processes")
    stage, tp_rank = divmod(rank, tp_size)
    tp_ranks = [list(range(s * tp_size, (s + 1) * tp_size)) for s in range(pp_size)]
    pp_ranks = [list(range(t, world, tp_size)) for t in range(tp_size)]
    tp = pp = SINGLE
    # new_group is collective: every rank creates every group, in the same order
    for ranks in tp_ranks:
        g = _group(ranks, world)
        if rank in ranks:
            tp = ParallelGroup(tp_rank, tp_size, g, tuple(ranks))
    for ranks in pp_ranks:
        g = _group(ranks, world)
        if rank in ranks:
            pp = ParallelGroup(stage, pp_size, g, tuple(ranks))
    return Layout(tp=tp, pp=pp, rank=rank, world=world)


def _group(ranks: list[int], world: int):
    if len(ranks) == world:
        return None                      # the default group: no second communicator
    return dist.new_group(ranks) if len(ranks) > 1 else None


# ---- shard arithmetic ---------------------------------------------------------------------
def split_size(n: int, world: int, what: str) -> int:
    """n / world, or a ShardError naming `what` when it does not divide."""
    if n % world:
        raise ShardError(f"{what}: {n} does not split over {world} ranks (not a multiple of {world})")
    return n // world


def shard(t: torch.Tensor, rank: int, world: int, *, dim: int = 0, parts: Sequence[int] | None = None,
          what: str = "weight") -> torch.Tensor:
    """Rank `rank`'s contiguous part of t along `dim`; with `parts` (sizes along dim summing to
    its length, e.g. gate and up rows) each part is split and the rank's pieces concatenated."""
    n = t.shape[dim]
    parts = [n] if parts is None else list(parts)
    if sum(parts) != n:
        raise ShardError(f"{what}: parts {parts} do not add up to its {n} {'rows' if dim == 0 else 'columns'}")
    pieces, start = [], 0
    for i, p in enumerate(parts):
        m = split_size(p, world, what if len(parts) == 1 else f"{what} part {i}")
        pieces.append(t.narrow(dim, start + rank * m, m))
        start += p
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)).contiguous()


def kv_head_range(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[range, range]:
    """(the q heads, the KV heads) rank `rank` of `world` holds. q heads split evenly; KV heads
    too when there are at least as many as ranks, else each rank holds the one KV head its q
    heads read (replicated over world / num_kv_heads ranks)."""
    hq = split_size(num_heads, world, "attention heads")
    if num_kv_heads % world == 0:
        hkv = num_kv_heads // world
        return range(rank * hq, (rank + 1) * hq), range(rank * hkv, (rank + 1) * hkv)
    if world % num_kv_heads:
        raise ShardError(f"key/value heads: {num_kv_heads} neither split over {world} ranks nor divide them "
                         f"(to be replicated)")
    kv = rank // (world // num_kv_heads)
    return range(rank * hq, (rank + 1) * hq), range(kv, kv + 1)


# ---- layers -------------------------------------------------------------------------------
class ColumnLinear(Linear):
    """A product whose output features are split over the group: this rank holds
    out_features / size rows of W (and of the bias) and returns its slice of y, or the whole of
    y with gather_output (an all-gather along the last dim). Keywords as runtime/linear.Linear
    (gated: each rank's rows are its gate slice then its up slice, `parts=(F, F)` in shard_from)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: ParallelGroup = SINGLE,
                 gather_output: bool = False, device=None, dtype=None):
        local = split_size(out_features, group.size, "ColumnLinear out_features")
        super().__init__(in_features, local, bias=bias, device=device, dtype=dtype)
        self.group, self.gather_output, self.full_out_features = group, gather_output, out_features

    @classmethod
    def shard_from(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group: ParallelGroup = SINGLE,
                   parts: Sequence[int] | None = None, gather_output: bool = False) -> "ColumnLinear":
        """This rank's rows of the full weight [out, in] (each of `parts` split on its own)."""
        lin = cls(weight.shape[1], weight.shape[0], bias is not None, group=group, gather_output=gather_output,
                  device="meta", dtype=weight.dtype)
        lin.weight = torch.nn.Parameter(shard(weight, group.rank, group.size, parts=parts, what="ColumnLinear weight"),
                                        requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(shard(bias, group.rank, group.size, parts=parts, what="ColumnLinear bias"),
                                          requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor, **epilogue) -> torch.Tensor:
        y = gemv(x, self.weight, self.bias, **epilogue)
        return self.group.all_gather(y, dim=-1) if self.gather_output else y


class RowLinear(Linear):
    """A product whose input features are split over the group: this rank holds in_features /
    size columns of W and multiplies its slice of x (the whole x with input_is_parallel=False:
    it takes its slice), then the partial products are summed: `reduce="all_reduce"` (every
    rank gets y), `"reduce_scatter"` (sequence parallel: each rank gets its rows of y, split
    along dim 0) or None (the caller reduces). The bias is added once, on rank 0 before the
    sum; `residual=` likewise (fused into the product's epilogue there)."""

    REDUCES = ("all_reduce", "reduce_scatter", None)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, group: ParallelGroup = SINGLE,
                 reduce: str | None = "all_reduce", input_is_parallel: bool = True, device=None, dtype=None):
        if reduce not in self.REDUCES:
            raise ValueError(f"RowLinear reduce must be one of {self.REDUCES}, got {reduce!r}")
        local = split_size(in_features, group.size, "RowLinear in_features")
        super().__init__(local, out_features, bias=bias, device=device, dtype=dtype)
        self.group, self.reduce, self.input_is_parallel = group, reduce, input_is_parallel
        self.full_in_features = in_features

    @classmethod
    def shard_from(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group: ParallelGroup = SINGLE,
                   reduce: str | None = "all_reduce", input_is_parallel: bool = True) -> "RowLinear":
        """This rank's columns of the full weight [out, in]; the bias whole (added on rank 0)."""
        lin = cls(weight.shape[1], weight.shape[0], bias is not None, group=group, reduce=reduce,
                  input_is_parallel=input_is_parallel, device="meta", dtype=weight.dtype)
        lin.weight = torch.nn.Parameter(shard(weight, group.rank, group.size, dim=1, what="RowLinear weight"),
                                        requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        return lin

    def forward(self, x: torch.Tensor, *, residual: torch.Tensor | None = None) -> torch.Tensor:
        if not self.input_is_parallel:
            x = x.narrow(-1, self.group.rank * self.in_features, self.in_features)
        first = self.group.rank == 0
        y = gemv(x, self.weight, self.bias if first else None, residual=residual if first else None)
        if self.reduce == "all_reduce":
            return self.group.all_reduce(y)
        if self.reduce == "reduce_scatter":
            return self.group.reduce_scatter(y, dim=0)
        return y


class VocabParallelEmbedding(Embedding):
    """The token embedding with its vocabulary rows split over the group: this rank holds rows
    [vocab_start, vocab_start + V / size); an id outside them gives a zero row (the gather
    kernel's out-of-range rule), so the all-reduce of every rank's rows is the full lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str | torch.dtype = torch.float32, *,
                 group: ParallelGroup = SINGLE, device=None, program=None):
        local = split_size(num_embeddings, group.size, "vocabulary (embedding rows)")
        super().__init__(local, embedding_dim, dtype, device=device, program=program)
        self.group, self.full_num_embeddings, self.vocab_start = group, num_embeddings, group.rank * local

    @classmethod
    def shard_from(cls, weight: torch.Tensor, *, group: ParallelGroup = SINGLE, program=None
                   ) -> "VocabParallelEmbedding":
        emb = cls(weight.shape[0], weight.shape[1], weight.dtype, group=group, device=weight.device, program=program)
        with torch.no_grad():
            emb.weight.copy_(shard(weight, group.rank, group.size, what="embedding weight"))
        return emb

    def forward(self, ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None:
            raise ValueError("VocabParallelEmbedding: out= is not served (the sum lands in a fresh tensor)")
        local = ids - self.vocab_start if self.vocab_start else ids
        return self.group.all_reduce(super().forward(local))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows from {self.vocab_start} of {self.full_num_embeddings}"


class ParallelLMHead(ColumnLinear):
    """The LM head with its vocabulary rows split over the group; returns the full logits
    (each rank's slice all-gathered along the last dim, identical on every rank)."""

    def __init__(self, in_features: int, vocab_size: int, bias: bool = False, *, group: ParallelGroup = SINGLE,
                 device=None, dtype=None):
        super().__init__(in_features, vocab_size, bias, group=group, gather_output=True, device=device, dtype=dtype)

    @classmethod
    def shard_from(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, group: ParallelGroup = SINGLE
                   ) -> "ParallelLMHead":
        lin = cls(weight.shape[1], weight.shape[0], bias is not None, group=group, device="meta", dtype=weight.dtype)
        lin.weight = torch.nn.Parameter(shard(weight, group.rank, group.size, what="LM head weight"),
                                        requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(shard(bias, group.rank, group.size, what="LM head bias"),
                                          requires_grad=False)
        return lin

