"""Decode steps of a whole model as CUDA-graph replays, one graph per batch-size bucket.

A captured step keeps the cache's bookkeeping on the device: from the slots of its sequences
it reads their lengths (the new tokens' positions), looks up their pages, writes each layer's
K/V there, increments the lengths and runs every layer, the final norm and the LM head. The
host, before a replay, only copies the step's token ids and slots into the graph's inputs (one
small copy), allocates a page where a sequence crosses into a new one (written to the device
page table before the replay) and advances its own mirror of the lengths: its cost does not
depend on the number of layers. A replayed step equals an eager one (tests/gpu).

Batches smaller than their bucket are padded with a reserved slot that owns one page: its rows
write there and their results are dropped; its length is reset at every replay.

Under tensor parallelism (models/parallel.py) the step's NCCL all-reduces and logit all-gather are
captured with it: every rank captures the same buckets in the same order (each runs the same
generate() calls), the warm-up before a capture creates NCCL's communicators, and the capture
checks only this thread's CUDA calls (NCCL's watchdog thread queries its events meanwhile). A
tensor-parallel model whose group is not NCCL (gloo) is refused.

Adapters (models/lora.py): each graph has a static int input of its rows' adapter slots (-1: the
base model; padding rows -1), copied in with the tokens and slots before every replay, and the
captured step runs under it (ModelAdapters.use inside the capture: the slot sorting and every
projection's LoRA route are part of the graph), so one graph serves any mix of adapters at its
batch size. Only steps whose routes read nothing back are captured (ModelAdapters.capture_blocker:
`blocker(n)` says why a step of n sequences cannot replay; the engine then steps eagerly). The
graphs hold the projections' pointers: when adapters change the model's modules (attach, detach:
models/lora.adapter_stamp) the graphs captured before are dropped and the next step captures anew.

Greedy decoding feeds itself: each graph ends with the argmax of its logits written into its own
token input, so consecutive steps of the same sequences need nothing from the host but the page
bookkeeping (`decode_greedy`); the host reads a step's tokens (a pinned copy) while the next
step runs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..runtime.kv_cache import PagedKVCache
from .lora import adapter_stamp, attached_adapters
from .model import DecoderModel, StepContext

__all__ = ["DecodeGraphs"]

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1) of [B, V] logits in two passes when V splits into chunks of 128-512:
    the arg-max of each chunk, then of the chunks' maxima. Same index (the first maximal one,
    NaN above all); at batch 1 torch's one-pass reduction of a 128256-wide row takes one block
    (36 us on the H200, 2.5% of a Llama-3-8B-shaped 8-layer step)."""
    B, V = logits.shape
    c = next((c for c in (256, 512, 384, 128) if V % c == 0 and V // c >= 8), 0)
    if not c:
        return logits.argmax(dim=-1)
    x = logits.view(B, V // c, c)
    i = x.argmax(dim=-1, keepdim=True)                       # [B, V/c, 1]: first max of each chunk
    best = x.gather(-1, i).squeeze(-1).argmax(dim=-1, keepdim=True)   # first chunk holding the max
    return (best * c + i.squeeze(-1).gather(-1, best)).squeeze(-1)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, cache: PagedKVCache, pad_slot: int, *, max_batch: int,
                 buckets: tuple[int, ...] | None = None):
        if cache.device.type != "cuda":
            raise ValueError("DecodeGraphs needs a CUDA cache")
        tp = getattr(getattr(model, "parallel", None), "tp", None)   # models/parallel.py's Layout
        if tp is not None and tp.size > 1 and dist.get_backend(tp.group) != "nccl":
            raise ValueError(f"DecodeGraphs: a tensor-parallel step captures its collectives only over NCCL "
                             f"(this group's backend is {dist.get_backend(tp.group)})")
        # in a process of a torch.distributed world, NCCL's watchdog thread may query events while we capture
        self._capture_mode = "thread_local" if dist.is_available() and dist.is_initialized() else "global"
        self.model, self.cache, self.pad_slot = model, cache, pad_slot
        bs = sorted(b for b in (buckets or DEFAULT_BUCKETS) if b < max_batch)
        self.buckets = (*bs, max_batch)
        self._graphs: dict[int, tuple] = {}
        self._pool = None
        self._pad = torch.tensor([pad_slot], dtype=torch.long, device=cache.device)
        self.replays = 0
        self._stamp = adapter_stamp(model)              # the model's modules the graphs were captured over
        self._blockers: dict[int, str | None] = {}      # bucket -> why its step cannot be captured
        self.recaptures = 0                             # times the graphs were dropped for new modules

    def bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"a decode step of {n} sequences is more than the largest bucket {self.buckets[-1]}")

    def _check_modules(self) -> None:
        """Drop the graphs captured over modules that adapters have since replaced."""
        stamp = adapter_stamp(self.model)
        if stamp != self._stamp:
            self._graphs.clear()
            self._blockers.clear()
            self._stamp = stamp
            self.recaptures += 1

    def blocker(self, n: int) -> str | None:
        """Why a decode step of n sequences cannot replay a graph (its adapters' routes read back
        to the host: ModelAdapters.capture_blocker at its bucket), or None where it can."""
        self._check_modules()
        b = self.bucket(n)
        if b not in self._blockers:
            attached = attached_adapters(self.model)
            self._blockers[b] = None if attached is None else attached.capture_blocker(b)
        return self._blockers[b]

    # ---- the captured step --------------------------------------------------------------
    def _body(self, tokens: torch.Tensor, slots: torch.Tensor, adapters: torch.Tensor) -> torch.Tensor:
        cache, P = self.cache, self.cache.page_size
        lens = cache._seq_lens
        lens.index_fill_(0, self._pad, 0)                 # padding rows: position 0 of the pad page
        pos = lens.index_select(0, slots)                  # the new tokens' positions (int32)
        lens.index_copy_(0, slots, pos + 1)                # every padding row writes the same value
        pages = cache._page_table[slots, torch.div(pos, P, rounding_mode="floor").long()]
        meta = torch.cat([pages, pos])
        ctx = StepContext(cache, slots.to(torch.int32), pos, cache.max_pages_per_seq * P, meta=meta)
        attached = attached_adapters(self.model)
        if attached is None:
            logits = self.model.step_logits(tokens.to(torch.int32), ctx)
        else:   # every row with its slot from the graph's input: the choice is made inside the graph
            with attached.use(adapters):
                logits = self.model.step_logits(tokens.to(torch.int32), ctx)
        nxt = greedy_argmax(logits)
        tokens.copy_(nxt)       # the greedy token is the next step's input (decode_greedy)
        return logits, nxt

    def _capture(self, b: int):
        dev = self.cache.device
        # the graph's inputs, rows of one buffer (one copy a replay): token ids, slots, adapter slots
        inputs = torch.tensor([[0], [self.pad_slot], [-1]], dtype=torch.long, device=dev).repeat(1, b)
        tokens, slots, adapters = inputs
        # warm up outside the capture (kernels compile and load on first use), on padding rows only
        self._body(tokens, slots, adapters)
        torch.cuda.synchronize(dev)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, capture_error_mode=self._capture_mode):
            logits, nxt = self._body(tokens, slots, adapters)
        staging = torch.empty((3, b), dtype=torch.long, pin_memory=True).numpy()   # a numpy view: cheap writes
        copied = torch.cuda.Event()
        copied.record()
        outs = [torch.empty(b, dtype=torch.long, pin_memory=True) for _ in range(2)]   # double-buffered
        hit = self._graphs[b] = [g, inputs, logits, staging, copied, nxt, outs, 0, None]
        return hit

    # ---- a step -------------------------------------------------------------------------
    def _check_step(self, n: int, adapters: list[int] | None) -> None:
        if adapters is not None and len(adapters) != n:
            raise ValueError(f"decode: one adapter slot per sequence: {len(adapters)} for {n} sequences")
        if adapters is not None and any(a >= 0 for a in adapters) and attached_adapters(self.model) is None:
            raise ValueError("decode: adapter slots for a model without attached adapters")
        why = self.blocker(n)
        if why is not None:   # never replay a step whose routes the graph could not hold
            raise ValueError(f"decode: a step of {n} sequences cannot replay a CUDA graph: {why}")

    @torch.no_grad()
    def decode(self, tokens: list[int], slots: list[int], adapters: list[int] | None = None) -> torch.Tensor:
        """One decode step: token ids and the distinct slots they extend (each slot must have a
        page for its new position: allocate() first), and each one's adapter slot (-1 or None:
        the base model). Returns logits [len(slots), V] (a view of the graph's output, valid
        until the next replay of the same bucket)."""
        n = len(slots)
        if n != len(tokens) or n == 0:
            raise ValueError("decode: one token per slot, at least one")
        self._check_step(n, adapters)
        b = self.bucket(n)
        self.cache.advance_host(slots)      # checks pages; the graph advances the device lengths
        self.cache.flush()                  # new pages (and freed sequences) onto the device first
        hit = self._graphs.get(b) or self._capture(b)
        g, inputs, logits, staging, copied = hit[:5]
        copied.synchronize()                # the last copy out of the staging buffer is done
        staging[0, :n] = tokens
        staging[1, :n] = slots
        staging[2, :n] = -1 if adapters is None else adapters
        staging[0, n:] = 0
        staging[1, n:] = self.pad_slot
        staging[2, n:] = -1
        inputs.copy_(torch.from_numpy(staging), non_blocking=True)
        copied.record()
        g.replay()
        hit[8] = (list(slots), None if adapters is None else list(adapters))
        self.replays += 1
        return logits[:n]

    @torch.no_grad()
    def decode_greedy(self, tokens: list[int] | None, slots: list[int], adapters: list[int] | None = None
                      ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """One greedy decode step whose input tokens are `tokens` (host ints) or, with None, the
        greedy tokens of the previous replay of these same slots (and adapters), still on the
        device. Returns (this step's greedy tokens as a pinned host tensor [len(slots)], an event
        recorded after their copy): read them after event.synchronize(), while later steps run."""
        n = len(slots)
        b = self.bucket(n)
        if tokens is None:
            self._check_step(n, adapters)
            hit = self._graphs.get(b)
            if hit is None or hit[8] != (list(slots), None if adapters is None else list(adapters)):
                raise ValueError("decode_greedy: tokens=None continues the previous step of the same slots "
                                 "and adapters")
            self.cache.advance_host(slots)
            self.cache.flush()
            hit[0].replay()
            self.replays += 1
        else:
            self.decode(tokens, slots, adapters)
            hit = self._graphs[b]
        hit[7] ^= 1
        out = hit[6][hit[7]][:n]
        out.copy_(hit[5][:n], non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return out, done
