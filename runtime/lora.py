"""Multi-LoRA serving: many adapters on one projection at once, each token naming its own.

    lora = MultiLoRA(4096, (4096, 1024, 1024), adapters=4, max_rank=64, dtype=torch.bfloat16, device="cuda")
    lora.set_adapter(0, A_q, B_q, lora_scale(alpha, r), part=0)   # slot 0, slice 0 (q): PEFT's lora_A.weight
                                                                  # [r, K] and lora_B.weight [O_s, r]
    qkv = LoRALinear(base, lora)          # base: torch.nn.Linear (runtime/linear.Linear too) or QuantLinear
    y = qkv(x, ids)                       # ids int [T]: each token's slot; -1 (or any id outside the slots): none

    y[t] = base(x)[t] + scale_es (x[t] @ A_es^T) @ B_es^T  in the columns of each slice s, e = ids[t]

A projection may be several fused ones (layerforge's q/k/v and gate/up): its output columns split
into slices, each with its adapters' own A, B, rank and scale (scale = lora_alpha / r, or
/ sqrt(r) with rsLoRA: `lora_scale`).

Storage: stacked by slot, padded to one rank R (the largest adapter's, rounded up to 8), as
vLLM stacks its max_lora_rank slots, not grouped by rank: one tensor an operand makes one launch
over every adapter (the decode kernels skip the rows past each adapter's rank, so a rank-8
adapter beside a rank-64 one costs its own bytes), one grouped GEMM, one dense GEMM; grouping by
rank would multiply the launches, which are the whole cost of a decode step's adapters, by the
number of distinct ranks. The price: memory for the zeros past each rank, and at prefill the
padded FLOPs of the LoRA GEMMs (small beside the base product's: K R / (K O) per product).
    lora_a   [slots + 1, S R, K]   slot e's lora_A of slice s in rows s R .. s R + r_es - 1, zeros after
                                   (in LoRALinear's folded storage, the rows after the base weight's)
    lora_b   [slots + 1, R, O]     lora_B transposed: row j holds column j of each slice's B in the
                                   slice's columns (the expand reads 8 output columns as 16 bytes)
    ranks    int32 [slots + 1, S], scales f32 [slots + 1, S]
    (KEXT: q/k/v and gate/up keep W, then the A rows, K + S slots R apart, each
    slice's B columns of every slot after W's: one prefill GEMM over [x | vm]; see KEXT below)
The last slot is all zeros: "no adapter" is one more group in the adapter-sorted order, whose
grouped products are zeros without a branch.

A step's choice, `AdapterBatch(ids, slots)`, is made once and shared by every projection of the
step (models/lora.py keeps it in an `AdapterContext`): the slot of each token, and the tokens
sorted by slot (runtime/moe_kernels.moe_align over slots + 1, the MoE layers' permutation kernel).
Each call takes one route, by its token count T (known on the host) and the store's shape:

- "kernels" (CUDA bf16/f16 on sm_80+, T <= DECODE_ROWS): folded, where LoRALinear keeps the
  adapters' A rows right after the base weight in one buffer (a torch.nn.Linear base) and they
  add at most 1/FOLD_MAX of its rows: one product x @ [W; A_all]^T (runtime/linear.gemv: the
  small-token kernel up to 16 rows, cuBLAS past) gives the base output and every slot's v, and the
  expand kernel (codegen/lora.py) writes out = y + bias + each token's v B^T scale: one launch
  besides the base product. Otherwise the shrink kernel (v [T, S R], each used adapter's A read
  once), the base product, and the expand kernel adding into the base output in place.
- "dense" (T > DECODE_ROWS, slots R <= DENSE_MAX_RANKS): V = x @ A_all^T over every slot, each
  token's row scaled by its adapter's scales and zero outside its slot's block (the mask kernel,
  codegen/lora.py: one pass); the delta is one
  GEMM a slice written into the output, and the base GEMM adds x @ W^T to it (out.addmm_: cuBLAS
  reads the delta as its C), so the expand costs no pass of its own over the output.
- "grouped" (past that): x's rows gathered in slot order (moe_gather), shrink and expand as
  torch._grouped_mm over the slots (sm_90 bf16; elsewhere one product a slot, the offsets read on
  the host), the expand's rows gathered back into token order as the base GEMM's C. It computes
  each token's own adapter only: it wins where the dense route's FLOPs over every slot would not.
- "torch" (CPU tensors, float32, anything else): the reference, PEFT's arithmetic in x's dtype:
  each adapter's tokens index_select'ed, (x A^T) B^T scale, index_add'ed.
The kernels and dense routes never read anything back to the host (a step can be captured in a
CUDA graph); the grouped route only on sm_90 in bf16; the torch route reads each adapter's tokens.
`MultiLoRA.capture_blocker(tokens, dtype, device)` says which, without a tensor (models/graphs.py
asks it before capturing a decode step with adapters).
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch

from ..codegen.lora import MAX_RANK, MAX_SLICES, plan_lora_expand, plan_lora_mask, plan_lora_shrink
from ..codegen.moe import MAX_EXPERTS
from .linear import LinearInputError, _epilogue, _packed, device_major, gemv, rms_norm
from .moe_kernels import moe_align, moe_gather

__all__ = ["MultiLoRA", "LoRALinear", "AdapterBatch", "AdapterContext", "LoRAInputError", "lora_scale", "unfold",
           "DECODE_ROWS", "DENSE_MAX_RANKS", "FOLD_MAX", "MAX_ADAPTERS"]

# steps of at most this many tokens run the shrink and expand kernels (CUDA cores: at 64 tokens of
# rank 16 a projection's adapters are tens of MFLOP); longer ones run GEMMs
DECODE_ROWS = 64
# the dense prefill route while slots x R stays at most this (its GEMMs' K: 256 is 6% of a
# 4096-wide product's FLOPs), the grouped route past it
DENSE_MAX_RANKS = 256
# decode steps fold the shrink into the base product while the slots' A rows (slots x S x R) are at
# most 1/FOLD_MAX of the base weight's rows (the bytes the product reads more)
FOLD_MAX = 8
MAX_ADAPTERS = MAX_EXPERTS - 1   # moe_align sorts over the slots and "no adapter"
# K-extended storage (with runtime/linear.STRIDED_W, which it needs; measured in benchmarks/NOTES.md,
# "The K-extended LoRA storage"): where a projection's outputs outnumber its inputs (q/k/v, gate/up), LoRALinear keeps W's
# rows K + S slots R apart with each slice's B blocks after them, [W | B-blocks; A | 0], so that a
# prefill's dense route is one GEMM [x | vm] @ [W | B-blocks]^T: the delta takes no pass of its own
# over the output (its write and the base GEMM reading it back: benchmarks/NOTES.md, "Multi-LoRA at
# prefill"); decode reads W and the A rows at that row stride (the small-token kernel's ldw).
KEXT = True
ROUTES = ("kernels", "dense", "grouped", "torch")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "f16"}


class LoRAInputError(LinearInputError):
    """Inputs a multi-LoRA product cannot take (shape, dtype, device, adapter ids), raised before any launch."""


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """PEFT's scaling of an adapter's product: lora_alpha / r, or lora_alpha / sqrt(r) (use_rslora)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class AdapterBatch:
    """One step's adapter choice, shared by every projection of the step: ids [T] (each token's
    slot in [0, slots); -1, or any id outside, is no adapter). What the routes need is computed
    on first use, on ids' device, without reading anything back (under a CUDA graph capture:
    inside it): `slot` (int32 [T], `slots` for no adapter), `permutation` (moe_align's offsets
    [slots + 2], pos [T], src [T]: the tokens sorted by slot, stably), `onehot` (f32 [T, slots]),
    `sorted_slot` (the slot of each sorted row)."""

    def __init__(self, ids: torch.Tensor, slots: int):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype.is_floating_point or ids.is_complex() \
                or ids.dtype == torch.bool:
            got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise LoRAInputError(f"adapter ids must be a 1-D integer tensor (one id a token), got {got}")
        if not isinstance(slots, int) or isinstance(slots, bool) or not 1 <= slots <= MAX_ADAPTERS:
            raise LoRAInputError(f"adapter slots must be an int in [1, {MAX_ADAPTERS}], got {slots!r}")
        self.ids = ids if ids.dtype == torch.int32 else ids.to(torch.int32)
        self.slots = slots

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.ids.device

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        # -1 and every id past the slots land on `slots`, the "no adapter" group
        return self.ids.clamp(-1, self.slots).remainder(self.slots + 1).contiguous()

    @functools.cached_property
    def permutation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return moe_align(self.slot.view(-1, 1), self.slots + 1)

    @functools.cached_property
    def onehot(self) -> torch.Tensor:
        return (self.slot.unsqueeze(1) == torch.arange(self.slots, device=self.device, dtype=torch.int32)).float()

    @functools.cached_property
    def sorted_slot(self) -> torch.Tensor:
        return self.slot[self.permutation[2].long()]


class AdapterContext:
    """The current step's AdapterBatch (or None: no adapter for any token), shared by the
    LoRALinear modules of one model; models/lora.py sets it around a step."""

    def __init__(self, slots: int):
        self.slots = slots
        self.batch: AdapterBatch | None = None


class MultiLoRA(torch.nn.Module):
    """The adapters of one projection, stacked by slot (the module's docstring). Its tensors are
    non-persistent buffers: adapters load from their own files (models/lora.py), and a model's
    state dict stays the base model's."""

    def __init__(self, in_features: int, out_features: int | Sequence[int], *, adapters: int, max_rank: int,
                 dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        slices = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        for name, v in (("in_features", in_features), ("adapters", adapters), ("max_rank", max_rank),
                        *((f"slice {i}", w) for i, w in enumerate(slices))):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MultiLoRA: {name} must be a positive int, got {v!r}")
        if not 1 <= len(slices) <= MAX_SLICES:
            raise ValueError(f"MultiLoRA: 1 to {MAX_SLICES} output slices, got {len(slices)}")
        if adapters > MAX_ADAPTERS:
            raise ValueError(f"MultiLoRA: at most {MAX_ADAPTERS} adapter slots, got {adapters}")
        R = -(-max_rank // 8) * 8
        if R > MAX_RANK:
            raise ValueError(f"MultiLoRA: max_rank {max_rank} is past the {MAX_RANK} the kernels serve")
        self.in_features, self.slices, self.rank, self.adapters = in_features, slices, R, adapters
        S, O = len(slices), sum(slices)
        self.register_buffer("lora_a", torch.zeros(adapters + 1, S * R, in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lora_b", torch.zeros(adapters + 1, R, O, dtype=dtype, device=device), persistent=False)
        self.register_buffer("ranks", torch.zeros(adapters + 1, S, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("scales", torch.zeros(adapters + 1, S, dtype=torch.float32, device=device),
                             persistent=False)
        # the K-extended storage's B blocks ([O, S slots R] columns after W's, LoRALinear's), or None
        self.b_ext: torch.Tensor | None = None
        # host copies of ranks and scales: the torch route and the checks read them without a sync
        self._host = [[(0, 0.0)] * S for _ in range(adapters)]

    @property
    def out_features(self) -> int:
        return sum(self.slices)

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Each slice's output columns [c0, c1)."""
        out, at = [], 0
        for w in self.slices:
            out.append((at, at + w))
            at += w
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, slices={list(self.slices)}, adapters={self.adapters}, rank={self.rank}"

    # ---- adapters -------------------------------------------------------------------------
    @torch.no_grad()
    def set_adapter(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                    part: int = 0) -> None:
        """Slot `slot`'s adapter on slice `part`: lora_a [r, K] and lora_b [O_s, r] as PEFT stores
        them (lora_A.weight, lora_B.weight), scale as `lora_scale` makes it."""
        self._check_slot(slot, part)
        K, R = self.in_features, self.rank
        c0, c1 = self.bounds[part]
        if lora_a.dim() != 2 or lora_a.shape[1] != K or not 1 <= lora_a.shape[0] <= R:
            raise LoRAInputError(f"set_adapter: lora_a must be [r, {K}] with 1 <= r <= {R}, got {list(lora_a.shape)}")
        r = lora_a.shape[0]
        if tuple(lora_b.shape) != (c1 - c0, r):
            raise LoRAInputError(f"set_adapter: lora_b must be [{c1 - c0}, {r}] (slice {part}'s columns, the rank "
                                 f"of lora_a), got {list(lora_b.shape)}")
        if not math.isfinite(scale):
            raise LoRAInputError(f"set_adapter: scale must be finite, got {scale!r}")
        rows = self.lora_a[slot, part * R:(part + 1) * R]
        rows.zero_()
        rows[:r].copy_(lora_a)
        cols = self.lora_b[slot, :, c0:c1]
        cols.zero_()
        cols[:r].copy_(lora_b.t())
        if self.b_ext is not None:
            blk = self._b_block(slot, part)
            blk.zero_()
            blk[:, :r].copy_(lora_b)
        self.ranks[slot, part] = r
        self.scales[slot, part] = float(scale)
        self._host[slot][part] = (r, float(scale))

    @torch.no_grad()
    def clear_adapter(self, slot: int, part: int | None = None) -> None:
        """Slot `slot` leaves slice `part` (every slice when None) untouched again."""
        for p in range(len(self.slices)) if part is None else (part,):
            self._check_slot(slot, p)
            R = self.rank
            c0, c1 = self.bounds[p]
            self.lora_a[slot, p * R:(p + 1) * R].zero_()
            self.lora_b[slot, :, c0:c1].zero_()
            if self.b_ext is not None:
                self._b_block(slot, p).zero_()
            self.ranks[slot, p] = 0
            self.scales[slot, p] = 0.0
            self._host[slot][p] = (0, 0.0)

    def _b_block(self, slot: int, part: int) -> torch.Tensor:
        """Slice `part`'s rows of the K-extended storage's columns of slot `slot`: [O_s, R]."""
        E, R = self.adapters, self.rank
        c0, c1 = self.bounds[part]
        j = (part * E + slot) * R
        return self.b_ext[c0:c1, j:j + R]

    def adapter_rank(self, slot: int, part: int = 0) -> int:
        self._check_slot(slot, part)
        return self._host[slot][part][0]

    def _check_slot(self, slot: int, part: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.adapters:
            raise LoRAInputError(f"adapter slot must be an int in [0, {self.adapters}), got {slot!r}")
        if not isinstance(part, int) or not 0 <= part < len(self.slices):
            raise LoRAInputError(f"slice must be an int in [0, {len(self.slices)}), got {part!r}")

    # ---- routes -----------------------------------------------------------------------------
    def route(self, x2: torch.Tensor) -> str:
        """Which route a call over x2 [T, K] takes (the module's docstring)."""
        return self.route_for(x2.shape[0], x2.dtype, x2.device)

    def route_for(self, tokens: int, dtype: torch.dtype, device: torch.device) -> str:
        """The route of a call over `tokens` rows of `dtype` on `device` (route(), without a tensor)."""
        device = torch.device(device)
        if not (device.type == "cuda" and dtype in _TYPES and dtype == self.lora_a.dtype
                and device == self.lora_a.device and self.in_features % 8 == 0
                and all(w % 8 == 0 for w in self.slices) and not torch.compiler.is_compiling()
                and device_major(device) >= 8):
            return "torch"
        if tokens <= DECODE_ROWS:
            return "kernels"
        return "dense" if self.adapters * self.rank <= DENSE_MAX_RANKS else "grouped"

    def capture_blocker(self, tokens: int, dtype: torch.dtype, device: torch.device) -> str | None:
        """Why a call over `tokens` rows cannot be captured in a CUDA graph (its route reads
        something back to the host), or None where it can: the kernels and dense routes always
        can, the grouped one where torch's grouped GEMM serves it, the torch route never."""
        route = self.route_for(tokens, dtype, device)
        if route in ("kernels", "dense") or (route == "grouped" and _grouped_mm_serves(dtype, torch.device(device))):
            return None
        if route == "grouped":
            return (f"the grouped route at {tokens} tokens ({self.adapters} slots x rank {self.rank} > "
                    f"{DENSE_MAX_RANKS}) reads each slot's row count on the host off sm_90 bf16")
        return (f"the torch route ({dtype} on {torch.device(device)}; the kernels take bf16/f16 on sm_80+ with "
                f"in/out features multiples of 8, here {self.in_features} -> {list(self.slices)}) reads each "
                "adapter's tokens on the host")

    def check_batch(self, batch: AdapterBatch, x2: torch.Tensor) -> None:
        if batch.slots != self.adapters:
            raise LoRAInputError(f"the adapter batch has {batch.slots} slots, the projection's adapters "
                                 f"{self.adapters}")
        if batch.tokens != x2.shape[0]:
            raise LoRAInputError(f"{batch.tokens} adapter ids for {x2.shape[0]} tokens")
        if batch.device != x2.device:
            raise LoRAInputError(f"the adapter ids are on {batch.device}, the tokens on {x2.device}")

    # ---- the decode kernels -----------------------------------------------------------------
    def shrink(self, x2: torch.Tensor, batch: AdapterBatch, *, out: torch.Tensor | None = None,
               cache=None) -> torch.Tensor:
        """v [T, S R] in x2's dtype: v[t, s R + j] = x[t] . A_es[j] for token t of slot e and j <
        r_es (the shrink kernel; other entries are not written). x2 [T, K] bf16/f16 CUDA,
        contiguous 16-byte aligned rows."""
        T, K, S, R = x2.shape[0], self.in_features, len(self.slices), self.rank
        if self.lora_a.stride(1) != K:
            raise LoRAInputError(f"shrink: the A rows are {self.lora_a.stride(1)} apart (a K-extended storage), the "
                                 f"kernel reads them {K} apart; the folded product serves such a store")
        self._check_kernel_call(x2, batch)
        if out is not None and (tuple(out.shape) != (T, S * R) or out.dtype != x2.dtype
                                or out.device != x2.device or not out.is_contiguous()):
            raise LoRAInputError(f"shrink: out must be a contiguous {x2.dtype} [{T}, {S * R}] on {x2.device}")
        v = torch.empty(T, S * R, dtype=x2.dtype, device=x2.device) if out is None else out
        offsets, _, src = batch.permutation
        dname = _TYPES[x2.dtype]
        launcher = _launcher(("shrink", dname, K, R, S, x2.device.index), x2.device,
                             lambda arch: plan_lora_shrink(dname, k=K, rank=R, slices=S, arch=arch), cache)
        launcher((self.adapters, T), [x2, self.lora_a, self.ranks, offsets, src, v, T])
        return v

    def expand(self, y: torch.Tensor, v: torch.Tensor, batch: AdapterBatch, *, out: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """out [T, O] = y[:, :O] (+ bias) + scale_es v_t,es B_es^T in slice s's columns, for each
        token t of slot e (the expand kernel). y: the base product [T, >= O] (last stride 1, rows
        16-byte aligned); v: [T, S R] (the shrink's: the token's own adapter) or [T, slots S R]
        (every slot's: the folded product's columns after O); out: a new [T, O] by default, or y
        itself (an add in place: y [T, O] contiguous, no bias). Returns out."""
        T, O, S, R, E = y.shape[0], self.out_features, len(self.slices), self.rank, self.adapters
        self._check_kernel_call(y, batch, rows=True)
        if y.dim() != 2 or y.shape[1] < O or y.stride(1) != 1 or y.stride(0) % 8:
            raise LoRAInputError(f"expand: y must be [{T}, >= {O}] with unit column stride and rows a multiple of "
                                 f"8 elements apart, got {list(y.shape)} strides {y.stride()}")
        if v.dim() != 2 or v.shape[0] != T or v.shape[1] not in (S * R, E * S * R) or v.stride(1) != 1 \
                or v.dtype != y.dtype or v.device != y.device:
            raise LoRAInputError(f"expand: v must be {y.dtype} [{T}, {S * R}] or [{T}, {E * S * R}] with unit column "
                                 f"stride, got {v.dtype} {list(v.shape)}")
        out = torch.empty(T, O, dtype=y.dtype, device=y.device) if out is None else out
        in_place = out.data_ptr() == y.data_ptr()
        if tuple(out.shape) != (T, O) or out.dtype != y.dtype or not out.is_contiguous() or out.data_ptr() % 16 \
                or (in_place and (y.stride(0) != O or bias is not None)):
            raise LoRAInputError(f"expand: out must be a contiguous 16-byte aligned {y.dtype} [{T}, {O}] (y itself "
                                 "only where y is [T, O] and there is no bias to add)")
        if bias is not None and (tuple(bias.shape) != (O,) or bias.dtype != y.dtype or bias.device != y.device
                                 or bias.data_ptr() % 16):
            raise LoRAInputError(f"expand: bias must be a 16-byte aligned {y.dtype} [{O}] on {y.device}")
        offsets, _, src = batch.permutation
        dname = _TYPES[y.dtype]
        has_bias = bias is not None
        launcher = _launcher(("expand", dname, self.slices, R, has_bias, y.device.index), y.device,
                             lambda arch: plan_lora_expand(dname, slices=self.slices, rank=R, bias=has_bias,
                                                           arch=arch), cache)
        vslot = S * R if v.shape[1] == E * S * R else 0
        launcher((E if in_place else E + 1, T),
                 [y, y.stride(0), v, v.stride(0), vslot, self.lora_b, self.ranks, self.scales, offsets, src,
                  *([bias] if has_bias else []), out, T, E])
        return out

    def _check_kernel_call(self, t: torch.Tensor, batch: AdapterBatch, rows: bool = False) -> None:
        if not t.is_cuda or t.dtype not in _TYPES or t.dtype != self.lora_a.dtype or t.device != self.lora_a.device:
            raise LoRAInputError(f"the LoRA kernels take {self.lora_a.dtype} CUDA tensors on {self.lora_a.device}, "
                                 f"got {t.dtype} on {t.device}")
        if not (rows or t.is_contiguous()) or t.data_ptr() % 16:
            raise LoRAInputError("the LoRA kernels take contiguous 16-byte aligned rows (a view at an odd offset "
                                 "needs .clone())")
        self.check_batch(batch, t)

    # ---- the prefill routes -----------------------------------------------------------------
    def delta(self, x2: torch.Tensor, batch: AdapterBatch, out: torch.Tensor, route: str | None = None) -> torch.Tensor:
        """Write every row of the adapters' delta [T, O] into out (zeros for tokens without an
        adapter), by `route` ("dense", "grouped" or "torch"; default: the dense route while it
        pays, else the grouped one, on CUDA; torch elsewhere)."""
        if route is None:
            route = self.route(x2)
            route = route if route != "kernels" else ("dense" if self.adapters * self.rank <= DENSE_MAX_RANKS
                                                      else "grouped")
        self.check_batch(batch, x2)
        if route == "dense":
            return self._dense(x2, batch, out)
        if route == "grouped":
            return self._grouped(x2, batch, out)
        if route == "torch":
            return out.copy_(self.reference(x2, batch))
        raise ValueError(f"delta: route must be 'dense', 'grouped' or 'torch', got {route!r}")

    def mask(self, v: torch.Tensor, batch: AdapterBatch, *, out: torch.Tensor | None = None,
             x: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """vm [T, S, slots, R] in v's dtype: v [T, slots S R] (every slot's shrink, rows 16-byte aligned)
        scaled by each token's slot's scales and zero in the other slots' blocks (the mask kernel
        on CUDA bf16/f16, torch elsewhere): the dense route's delta GEMMs' operand. out: a [T, S
        slots R] view to write instead (unit column stride, rows 16-byte aligned); returned as it is.
        x: [T, K] (contiguous): out is then the whole K-extended operand [T, K + S slots R], x copied
        into its first K columns and the mask after them, by the same launch."""
        E, S, R, T = self.adapters, len(self.slices), self.rank, v.shape[0]
        C = E * S * R
        K = 0 if x is None else x.shape[-1]
        if v.shape != (T, C) or v.stride(1) != 1:
            raise LoRAInputError(f"mask: v must be [{T}, {C}] with unit column stride, got {list(v.shape)}")
        if x is not None and (out is None or x.shape != (T, K) or not x.is_contiguous() or x.dtype != v.dtype
                              or x.device != v.device or x.data_ptr() % 16 or K % 8):
            raise LoRAInputError(f"mask: x must be a contiguous 16-byte aligned {v.dtype} [{T}, K] (K a multiple "
                                 "of 8) with an out to hold [x | vm]")
        if out is not None and (tuple(out.shape) != (T, K + C) or out.stride(1) != 1 or out.dtype != v.dtype
                                or out.device != v.device or out.data_ptr() % 16 or out.stride(0) % 8):
            raise LoRAInputError(f"mask: out must be a {v.dtype} [{T}, {K + C}] view with unit column stride and "
                                 "16-byte aligned rows")
        self.check_batch(batch, v)
        vm = torch.empty(T, S, E, R, dtype=v.dtype, device=v.device) if out is None else out
        if v.is_cuda and v.dtype in _TYPES and v.data_ptr() % 16 == 0 and v.stride(0) % 8 == 0 \
                and device_major(v.device) >= 8:
            dname = _TYPES[v.dtype]
            launcher = _launcher(("mask", dname, E, R, S, K, v.device.index), v.device,
                                 lambda arch: plan_lora_mask(dname, slots=E, rank=R, slices=S, copy_k=K, arch=arch),
                                 cache)
            launcher((T,), [v, v.stride(0), batch.slot, self.scales, *([x] if K else []), vm,
                            C if out is None else out.stride(0), T])
            return vm
        if K:
            out[:, :K].copy_(x)
            self.mask(v, batch, out=out[:, K:])
            return out
        ms = batch.onehot.unsqueeze(-1) * self.scales[:E]                  # [T, E, S]: the token's slot only
        m = torch.mul(v.view(T, E, S, R).transpose(1, 2), ms.transpose(1, 2).unsqueeze(-1))   # f32: rounded once
        return vm.copy_(m.reshape(vm.shape))

    def every_slot_v(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 @ A_all^T [T, slots S R] (torch's GEMM): every slot's shrink, the dense route's."""
        E, S, R, K = self.adapters, len(self.slices), self.rank, self.in_features
        return x2 @ self.lora_a[:E].reshape(E * S * R, K).t()

    def _dense(self, x2: torch.Tensor, batch: AdapterBatch, out: torch.Tensor) -> torch.Tensor:
        E, R, T = self.adapters, self.rank, x2.shape[0]
        vm = self.mask(self.every_slot_v(x2), batch)                      # [T, S, E, R]: the token's slot only
        for s, (c0, c1) in enumerate(self.bounds):   # views of vm, B and out: cuBLAS takes their row strides
            out[:, c0:c1].addmm_(vm[:, s].reshape(T, E * R), self.lora_b[:E, :, c0:c1].reshape(E * R, c1 - c0),
                                 beta=0)                 # (beta 0: out's old contents are not read)
        return out

    def _grouped(self, x2: torch.Tensor, batch: AdapterBatch, out: torch.Tensor) -> torch.Tensor:
        S, R, T = len(self.slices), self.rank, x2.shape[0]
        offsets, pos, src = batch.permutation
        xs = moe_gather(x2, src)                                            # rows in slot order
        v = _segmented(xs, self.lora_a.transpose(1, 2), offsets)            # [T, S R]
        v = (v.view(T, S, R) * self.scales[batch.sorted_slot.long()].unsqueeze(-1)).to(x2.dtype)
        for s, (c0, c1) in enumerate(self.bounds):
            if S == 1:
                moe_gather(_segmented(v.view(T, R), self.lora_b, offsets), pos, out=out)
            else:
                d = _segmented(v[:, s].contiguous(), self.lora_b[:, :, c0:c1].contiguous(), offsets)
                out[:, c0:c1].copy_(moe_gather(d, pos))
        return out

    def reference(self, x2: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """The delta [T, O] in x2's dtype, as PEFT computes each adapter's: its tokens' rows,
        (x A^T) B^T * scale, in x2's dtype (reads each slot's tokens back to the host)."""
        self.check_batch(batch, x2)
        out = torch.zeros(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        R = self.rank
        for e in range(self.adapters):
            if not any(r for r, _ in self._host[e]):
                continue
            rows = (batch.slot == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xe = x2.index_select(0, rows)
            for s, (c0, c1) in enumerate(self.bounds):
                r, scale = self._host[e][s]
                if r:
                    a, bt = self.lora_a[e, s * R:s * R + r], self.lora_b[e, :r, c0:c1]
                    out[:, c0:c1].index_add_(0, rows, (xe @ a.t()) @ bt * scale)
        return out


class LoRALinear(torch.nn.Module):
    """A projection plus its adapters: forward(x, adapter_ids) = base(x) + the adapters' products
    of each token (the module's docstring; ids per token, an AdapterBatch, or None: the context's
    batch, and without one the base alone).

    A torch.nn.Linear base (runtime/linear.Linear too) lends its `weight` and `bias` to this
    module, so a model's state-dict names stay the base's. With fold (the default, where the
    dtypes and devices agree), its weight moves into one buffer with the adapters' A rows after
    it, [W; A of every slot], and the base module's weight becomes a view of it (no second copy of
    W): decode steps then take every slot's shrink from the base product (the "kernels" route).
    Anything that copies the tensors apart (.to(), load_state_dict's assign) only turns that off:
    `folded()` finds out per call. Another base (QuantLinear) stays a submodule, `base`.

    Not a torch.nn.Linear itself on purpose: the models' fused paths treat a Linear as a bare
    weight (runtime/linear.gemv), which would drop the adapters; they call this module instead,
    whose gated / residual / norm keywords (runtime/linear.gemv's) run around the products,
    unfused, with the same meaning."""

    def __init__(self, base: torch.nn.Module, lora: MultiLoRA, *, context: AdapterContext | None = None,
                 fold: bool = True):
        super().__init__()
        if isinstance(base, torch.nn.Linear):
            in_f, out_f = base.in_features, base.out_features
        else:
            in_f, out_f = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if (in_f, out_f) != (lora.in_features, lora.out_features):
            raise ValueError(f"LoRALinear: the base projection is {in_f} -> {out_f}, the adapters "
                             f"{lora.in_features} -> {lora.out_features}")
        self.in_features, self.out_features = in_f, out_f
        self.lora = lora
        self.context = context
        if isinstance(base, torch.nn.Linear):
            w = base.weight
            if fold and w.dtype == lora.lora_a.dtype and w.device == lora.lora_a.device:
                _fold(base, lora)
            self.weight = base.weight
            self.register_parameter("bias", base.bias)
            self.base = None
        else:
            self.weight = self.bias = None
            self.base = base

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | AdapterBatch | Sequence[int] | None = None, *,
                gated: str | None = None, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None, norm_offset: float = 0.0) -> torch.Tensor:
        if norm is not None:
            x = rms_norm(x, norm[0], norm[1], norm_offset)
        if x.shape[-1] != self.in_features:
            raise LoRAInputError(f"x's last dim {x.shape[-1]} is not the projection's {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self.project(x2, self._batch(adapter_ids, x2))
        if gated is not None or residual is not None:
            y = _epilogue(y, gated, None if residual is None else residual.reshape(y.shape[0], -1))
        return y.reshape(*lead, y.shape[-1])

    def project(self, x2: torch.Tensor, batch: AdapterBatch | None) -> torch.Tensor:
        """base(x2) + the adapters' delta, [T, O], by the store's route for x2."""
        T, O = x2.shape[0], self.out_features
        if batch is None or T == 0:
            return self.base_product(x2)
        lora = self.lora
        lora.check_batch(batch, x2)
        route = lora.route(x2)
        if route == "torch":
            return self.base_product(x2) + lora.reference(x2, batch)
        x2 = _packed(x2, 16)
        if route == "kernels":
            wf = self.folded()
            if wf is not None and FOLD_MAX * (wf.shape[0] - O) <= O:
                y = gemv(x2, wf)                      # [T, O + slots S R]: x W^T, then every slot's v
                return lora.expand(y, y[:, O:], batch, bias=self.bias)
            v = lora.shrink(x2, batch)
            y = _packed(self.base_product(x2), 16)
            return lora.expand(y, v, batch, out=y)
        if route == "dense":
            wx = self.kext_weight()
            if wx is not None:   # one GEMM over [x | vm]: the delta without a pass of its own
                xe = torch.empty(T, wx.shape[1], dtype=x2.dtype, device=x2.device)
                lora.mask(lora.every_slot_v(x2), batch, out=xe, x=x2)   # [x | vm] by one launch
                return torch.nn.functional.linear(xe, wx, self.bias)
        out = torch.empty(T, O, dtype=x2.dtype, device=x2.device)
        lora.delta(x2, batch, out, route)
        if self.weight is None:        # a base of its own kind: its product, then the delta added
            return out.add_(self.base_product(x2))
        out.addmm_(x2, self.weight.t())   # the base GEMM adds x W^T to the delta (beta = 1)
        return out if self.bias is None else out.add_(self.bias)

    def base_product(self, x2: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return gemv(x2, self.weight, self.bias)
        return self.base(x2)

    def folded(self) -> torch.Tensor | None:
        """[W; A of slots 0 .. slots - 1] as one [O + slots S R, K] matrix, a view, where the
        storage still holds them so (else None)."""
        w, a = self.weight, self.lora.lora_a
        if w is None or w.dtype != a.dtype or w.device != a.device:
            return None
        O, K = w.shape
        ld = w.stride(0)      # K, or K + S slots R in the K-extended storage
        if (w.stride(1) != 1 or a.dim() != 3 or a.stride(2) != 1 or a.stride(1) != ld
                or a.stride(0) != a.shape[1] * ld or ld < K
                or w.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
                or a.data_ptr() != w.data_ptr() + O * ld * w.element_size()):
            return None
        lora = self.lora
        return torch.as_strided(w.detach(), (O + lora.adapters * len(lora.slices) * lora.rank, K), (ld, 1))

    def kext_weight(self) -> torch.Tensor | None:
        """[W | B-blocks] as one [O, K + S slots R] matrix, a view, where the K-extended storage still
        holds them so (else None): the prefill GEMM's weight over [x | vm]."""
        w, b = self.weight, self.lora.b_ext
        if w is None or b is None:
            return None
        O, K = w.shape
        C = b.shape[1]
        if (w.stride() != (K + C, 1) or b.stride() != (K + C, 1) or tuple(b.shape) != (O, C)
                or w.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
                or b.data_ptr() != w.data_ptr() + K * w.element_size()):
            return None
        return torch.as_strided(w.detach(), (O, K + C), (K + C, 1))

    def _batch(self, adapter_ids, x2: torch.Tensor) -> AdapterBatch | None:
        if adapter_ids is None:
            return None if self.context is None else self.context.batch
        if isinstance(adapter_ids, AdapterBatch):
            return adapter_ids
        if not isinstance(adapter_ids, torch.Tensor):
            adapter_ids = torch.tensor(list(adapter_ids), dtype=torch.int32, device=x2.device)
        return AdapterBatch(adapter_ids, self.lora.adapters)


@torch.no_grad()
def _fold(base: torch.nn.Linear, lora: MultiLoRA) -> None:
    """Move base's weight and lora's A rows (every slot, the zero one last) into one buffer
    [W; A]: base.weight and lora.lora_a become views of it (W is copied once, not kept twice)."""
    w, a = base.weight, lora.lora_a
    O, K = w.shape
    if _kext_fits(O, K, lora):
        _fold_kext(base, lora)
        return
    ext = torch.empty(O + a.numel() // K, K, dtype=w.dtype, device=w.device)
    ext[:O].copy_(w)
    ext[O:].copy_(a.view(-1, K))
    base.weight = torch.nn.Parameter(ext[:O], requires_grad=w.requires_grad)
    lora.lora_a = ext[O:].view(a.shape)


def _kext_fits(O: int, K: int, lora: MultiLoRA) -> bool:
    """Whether _fold lays the projection out K-extended (KEXT): more outputs than inputs (the delta's
    pass over the output costs more than copying x into [x | vm]), the dense prefill route, and the
    A rows within the decode fold's bound."""
    from . import linear
    ESR = lora.adapters * len(lora.slices) * lora.rank
    return (KEXT and linear.STRIDED_W and O > K and K % 8 == 0 and lora.adapters * lora.rank <= DENSE_MAX_RANKS
            and FOLD_MAX * ESR <= O)


def _fold_kext(base: torch.nn.Linear, lora: MultiLoRA) -> None:
    """One buffer [W | B-blocks; A | 0] of rows K + C (C = S slots R): W's rows with, after them,
    each slice's B columns of every slot (column K + (s slots + e) R + j holds B_es[:, j] in slice
    s's rows, zeros elsewhere: the layout of the mask kernel's vm), then every slot's A rows (the
    zero slot last). base.weight, lora.lora_a and lora.b_ext become views of it."""
    w, a, b = base.weight, lora.lora_a, lora.lora_b
    O, K = w.shape
    E, S, R = lora.adapters, len(lora.slices), lora.rank
    C = E * S * R
    ext = torch.zeros(O + a.numel() // K, K + C, dtype=w.dtype, device=w.device)
    ext[:O, :K].copy_(w)
    ext[O:, :K].copy_(a.reshape(-1, K))
    lora.b_ext = ext[:O, K:]
    for s, (c0, c1) in enumerate(lora.bounds):
        for e in range(E):
            lora._b_block(e, s).copy_(b[e, :, c0:c1].t())
    base.weight = torch.nn.Parameter(ext[:O, :K], requires_grad=w.requires_grad)
    lora.lora_a = ext[O:, :K].view(a.shape)


def unfold(base: torch.nn.Linear) -> None:
    """Give base's weight a storage of its own again (after the LoRALinear that folded it is gone)."""
    w = base.weight
    if w.untyped_storage().nbytes() > w.numel() * w.element_size():
        with torch.no_grad():
            base.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)


# ---- products ---------------------------------------------------------------------------------
_KERNELS: dict[tuple, object] = {}


def _launcher(key: tuple, device: torch.device, make_plan, cache):
    hit = _KERNELS.get(key)
    if hit is None:
        from .launch import device_arch, load_plan
        hit = _KERNELS[key] = load_plan(make_plan(device_arch(device)), device, cache)
    return hit


def _segmented(xs: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """xs [P, K] (rows sorted by group) times each group's w[g] [K, N] over its rows offsets[g] ..
    offsets[g + 1] - 1 (offsets [G + 1], offsets[G] = P): torch's grouped GEMM where it has one
    (sm_90, bf16), else one product a group (the offsets read on the host)."""
    if _grouped_mm_serves(xs.dtype, xs.device):
        return torch._grouped_mm(xs, w, offs=offsets[1:])
    out = torch.empty(xs.shape[0], w.shape[2], dtype=xs.dtype, device=xs.device)
    bounds = offsets.tolist()
    for g in range(w.shape[0]):
        a, b = bounds[g], bounds[g + 1]
        if b > a:
            torch.matmul(xs[a:b], w[g], out=out[a:b])
    return out


def _grouped_mm_serves(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether _segmented runs torch's grouped GEMM (one launch, offsets on the device) there."""
    return device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") \
        and device_major(device) == 9
