"""Serving a DecoderModel: a paged-cache manager, steps over many sequences, generation.

    engine = Engine(model, max_seqs=8, max_seq_len=4096)
    a = engine.add([1, 15043, 29892])            # a sequence joins: its slot
    b = engine.add(prompt_b)
    out = engine.step()                           # {slot: logits [V]} of sequences that need a token
    engine.feed(a, next_token)                    # the token it decodes next step
    engine.release(b)                             # a sequence leaves; its pages are free again

A step runs every active sequence once: sequences with prompt tokens left take a chunk of them
(chunked prefill: at most `prefill_chunk` tokens a step over all sequences), the others their
one new token, all in one model step (the ragged prefill kernels serve both). A step in which
every sequence decodes one token replays a CUDA graph (models/graphs.py) on a GPU, where the
model's step can be captured (DecoderModel.capturable): its cache bookkeeping runs on the
device, so its host cost does not grow with the number of layers.

`generate(model, prompts, ...)`: greedy or sampled (temperature, top-k, top-p) generation with
stop tokens, of several prompts of different lengths together.

Adapters (models/lora.py): on a model with attached adapters each sequence names its own,
`engine.add(prompt, adapter="sql")` (a name, a slot, or None for the base model), and
`generate(model, prompts, ..., adapters=["sql", None, ...])` one a prompt. Every step runs
under its tokens' adapter slots (prefill chunks and decode tokens alike: ModelAdapters.use);
a captured decode step reads them from its graph's static input, so one graph serves any mix.
Where a decode step with adapters cannot be captured (a projection's LoRA route reads back to
the host: ModelAdapters.capture_blocker) it runs eagerly, its reason counted in
`engine.eager_steps`. A sequence's adapter is looked up by name at every step: one unloaded
meanwhile is an EngineError before the step changes anything.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from functools import partial

import torch

from .lora import attached_adapters
from .model import DecoderModel

__all__ = ["Engine", "generate", "sample", "EngineError", "adapter_name"]


class EngineError(ValueError):
    """A request the engine cannot serve: no free slot, a sequence longer than max_seq_len,
    an unknown slot, an adapter the model does not have."""


@dataclass
class _Seq:
    tokens: list[int]
    fed: int = 0                 # tokens already in the cache
    new: list[int] = field(default_factory=list)
    adapter: str | None = None   # its adapter's name (None: the base model)


def adapter_name(model: DecoderModel, adapter, where: str = "add") -> str | None:
    """The name of the attached adapter `adapter` names (a name, a slot, or None: the base
    model); EngineError for one the model does not have."""
    if adapter is None:
        return None
    attached = attached_adapters(model)
    if attached is None:
        raise EngineError(f"{where}: adapter {adapter!r}, but the model has no adapters attached "
                          "(models/lora.attach_adapters)")
    names = attached.slot_names
    if isinstance(adapter, str):
        if adapter not in names:
            raise EngineError(f"{where}: no adapter {adapter!r} (attached: {', '.join(attached.names)})")
        return adapter
    try:
        slot = None if isinstance(adapter, bool) else operator.index(adapter)
    except TypeError:
        slot = None
    if slot is None:
        raise EngineError(f"{where}: an adapter is a name, a slot (int) or None, got {type(adapter).__name__}")
    if not 0 <= slot < len(names) or names[slot] is None:
        held = ", ".join(f"{i}: {n}" for i, n in enumerate(names) if n is not None)
        raise EngineError(f"{where}: adapter slot {slot} holds no adapter (slots: {held})")
    return names[slot]


class Engine:
    def __init__(self, model: DecoderModel, *, max_seqs: int = 8, max_seq_len: int = 2048,
                 num_pages: int | None = None, prefill_chunk: int = 2048, cuda_graphs: bool | None = None,
                 graph_buckets: tuple[int, ...] | None = None):
        if max_seqs < 1 or max_seq_len < 1 or prefill_chunk < 1:
            raise EngineError("max_seqs, max_seq_len and prefill_chunk must be positive")
        self.model = model
        P = model.page_size
        self.max_seqs, self.max_seq_len, self.prefill_chunk = max_seqs, max_seq_len, prefill_chunk
        pages_per_seq = -(-max_seq_len // P)
        if num_pages is None:
            num_pages = max_seqs * pages_per_seq
        # one more slot, with one page, for the padding rows of captured decode steps
        self.pad_slot = max_seqs
        self.cache = model.make_cache(num_pages=num_pages + 1, max_seqs=max_seqs + 1,
                                      max_pages_per_seq=pages_per_seq)
        self.cache.allocate(self.pad_slot, 1)
        self._free = list(range(max_seqs - 1, -1, -1))
        # LongRoPE (Phi-3's long-context models): the length past which a sequence takes the long factors
        self._longrope = getattr(model, "longrope_threshold", lambda: None)()
        self.seqs: dict[int, _Seq] = {}
        on_gpu = model.device.type == "cuda"
        if cuda_graphs and not on_gpu:
            raise EngineError("cuda_graphs needs the model on a CUDA device")
        if cuda_graphs and not model.capturable(max_seqs):
            raise EngineError(f"cuda_graphs: a decode step of {max_seqs} sequences of this model cannot be captured "
                              f"(its MoE layers read expert row counts on the host, or its LongRoPE attention takes "
                              f"its short or long factors by the step's positions on the host)")
        self.graphs = None
        self.eager_steps: dict[str, int] = {}   # decode steps that could not replay a graph: reason -> count
        if on_gpu and cuda_graphs is not False and model.capturable(max_seqs):
            from .graphs import DecodeGraphs
            self.graphs = DecodeGraphs(model, self.cache, self.pad_slot, max_batch=max_seqs, buckets=graph_buckets)

    # ---- sequences ----------------------------------------------------------------------
    def add(self, prompt, adapter: str | int | None = None) -> int:
        """A sequence joins with its prompt (token ids) and its adapter (a name or slot of the
        model's attached adapters; None: the base model); returns its slot."""
        name = adapter_name(self.model, adapter)
        tokens = [int(t) for t in prompt]
        if not tokens:
            raise EngineError("add: the prompt is empty")
        if len(tokens) > self.max_seq_len:
            raise EngineError(f"add: the prompt has {len(tokens)} tokens; max_seq_len is {self.max_seq_len}")
        vocab = self.model.spec.vocab_size
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise EngineError(f"add: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not self._free:
            raise EngineError(f"add: all {self.max_seqs} slots are taken; release() one first")
        slot = self._free.pop()
        self.seqs[slot] = _Seq(tokens, adapter=name)
        return slot

    def feed(self, slot: int, token: int) -> None:
        """The token sequence `slot` takes next (the one sampled from its last logits)."""
        s = self._get(slot)
        if len(s.tokens) >= self.max_seq_len:
            raise EngineError(f"feed: sequence {slot} reached max_seq_len {self.max_seq_len}")
        if not 0 <= int(token) < self.model.spec.vocab_size:
            raise EngineError(f"feed: token id {int(token)} is outside the vocabulary")
        s.tokens.append(int(token))
        s.new.append(int(token))

    def release(self, slot: int) -> None:
        """A sequence leaves: its pages go back to the free list, its slot to new sequences."""
        self._get(slot)
        del self.seqs[slot]
        self.cache.free(slot)
        self._free.append(slot)
        self._free.sort(reverse=True)   # add() takes the lowest free slot: the same prompts get the same slots

    def length(self, slot: int) -> int:
        return len(self._get(slot).tokens)

    def adapter(self, slot: int) -> str | None:
        """The adapter sequence `slot` runs with (None: the base model)."""
        return self._get(slot).adapter

    def adapter_slots(self, slots) -> list[int] | None:
        """Each sequence's adapter slot now (-1: none), or None when the model has no adapters
        attached; EngineError where a sequence's adapter is gone (unloaded, detached)."""
        attached = attached_adapters(self.model)
        if attached is None:
            lost = next((s for s in slots if self.seqs[s].adapter is not None), None)
            if lost is not None:
                raise EngineError(f"sequence {lost}'s adapter {self.seqs[lost].adapter!r} is gone: the model's "
                                  "adapters were detached")
            return None
        index = {n: i for i, n in enumerate(attached.slot_names) if n is not None}
        out = []
        for s in slots:
            name = self.seqs[s].adapter
            if name is not None and name not in index:
                raise EngineError(f"sequence {s}'s adapter {name!r} is gone (attached: {', '.join(index) or 'none'})")
            out.append(-1 if name is None else index[name])
        return out

    def _get(self, slot: int) -> _Seq:
        try:
            return self.seqs[slot]
        except KeyError:
            raise EngineError(f"sequence {slot} is not active") from None

    # ---- steps --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[int, torch.Tensor]:
        """Run every active sequence with tokens to feed once; returns {slot: logits [V]} for each
        sequence whose tokens are all in the cache after the step (it needs its next token)."""
        work = sorted((slot, s) for slot, s in self.seqs.items() if s.fed < len(s.tokens))
        if not work:
            return {}
        per_seq = self.adapter_slots([slot for slot, _ in work])   # checked before anything changes
        if self.graphs is not None and all(len(s.tokens) - s.fed == 1 for _, s in work) \
                and self.graph_serves(len(work)):
            slots = [slot for slot, _ in work]
            tokens = [s.tokens[-1] for _, s in work]
            self.cache.reserve(slots, [s.fed + 1 for _, s in work])
            logits = self.graphs.decode(tokens, slots, per_seq)
            for _, s in work:
                s.fed += 1
            return {slot: logits[i] for i, slot in enumerate(slots)}
        threshold = self._longrope
        if threshold is not None:
            for slot, s in work:
                if 0 < s.fed <= threshold < len(s.tokens):
                    # LongRoPE: a sequence passing original_max_position from here on takes the long factors; its
                    # cache, computed with the short ones, is computed again with them (transformers' Phi-3 does
                    # the same: it drops the cache at that step and runs the whole sequence)
                    self.cache.free(slot)
                    s.fed = 0
        budget = self.prefill_chunk
        chunks = []
        prompt = False   # a prompt chunk is in this step: at least one goes, so no prompt starves
        for slot, s in work:
            n = len(s.tokens) - s.fed
            if n > 1:        # prompt tokens: a chunk of what the budget leaves; no more once it is spent
                if budget <= 0 and prompt:
                    continue
                n = max(1, min(n, budget))
                prompt = True
            budget -= n
            chunks.append((slot, s, n))
        for slot, s, n in chunks:
            self.cache.allocate(slot, s.fed + n)
        # LongRoPE: a step runs one set of factors, so the sequences past original_max_position (by their whole
        # length, as transformers decides over the text it runs) step apart from the others
        groups = [(chunks, None)]
        if threshold is not None:
            parts = {long: [c for c in chunks if (len(c[1].tokens) > threshold) == long] for long in (False, True)}
            groups = [(g, long) for long, g in parts.items() if g]
        out = {}
        for group, long in groups:
            logits = self._run(group, work, per_seq, long)
            for i, (slot, s, n) in enumerate(group):
                s.fed += n
                if s.fed == len(s.tokens):
                    out[slot] = logits[i]
        return out

    def _run(self, chunks, work, per_seq, long_rope):
        """The model's step over `chunks` ((slot, sequence, tokens) in order): each sequence's last logits."""
        ids = [t for _, s, n in chunks for t in s.tokens[s.fed: s.fed + n]]
        seq_ids = [slot for slot, _, n in chunks for _ in range(n)]
        tokens = torch.tensor(ids, dtype=torch.int32).to(self.model.device, non_blocking=True)
        kw = {} if long_rope is None else {"long_rope": long_rope}
        if per_seq is None:
            return self.model.step(tokens, seq_ids, self.cache, **kw)
        # each token runs with its sequence's adapter (none at all: the base products alone)
        of = dict(zip((slot for slot, _ in work), per_seq))
        choice = [of[slot] for slot, _, n in chunks for _ in range(n)]
        choice = None if all(a < 0 for a in choice) else \
            torch.tensor(choice, dtype=torch.int32).to(self.model.device, non_blocking=True)
        with attached_adapters(self.model).use(choice):
            return self.model.step(tokens, seq_ids, self.cache, **kw)

    def graph_serves(self, n: int) -> bool:
        """Whether a decode step of n sequences replays a CUDA graph; where the graphs cannot
        capture it (DecodeGraphs.blocker: the adapters' routes), counts the step's reason in
        eager_steps and says no."""
        if self.graphs is None:
            return False
        why = self.graphs.blocker(n)
        if why is not None:
            self.eager_steps[why] = self.eager_steps.get(why, 0) + 1
        return why is None


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [N] from logits [N, V]: greedy when temperature is 0, else softmax(logits /
    temperature) restricted to the top_k most likely (0: all) and to the smallest set whose
    probability reaches top_p, sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("sample: temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    x = logits.float() / temperature
    if top_k:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    return torch.multinomial(x.softmax(dim=-1), 1, generator=generator)[..., 0]


@torch.no_grad()
def generate(model: DecoderModel, prompts, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_tokens=(),
             seed: int | None = None, prefill_chunk: int = 2048, cuda_graphs: bool | None = None,
             adapters=None) -> list[list[int]]:
    """Generate for several prompts (lists of token ids) together; returns each one's new tokens
    (ending with the stop token when one was produced). Greedy unless do_sample. Every prompt is
    prefilled (in chunks of prefill_chunk tokens a step) before the batch decodes together.
    adapters: one a prompt (a name or slot of the model's attached adapters, None: the base
    model), or None: every prompt on the base model."""
    prompts = [[int(t) for t in p] for p in prompts]
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if adapters is not None:   # checked before the engine is touched
        adapters = list(adapters)
        if len(adapters) != len(prompts):
            raise EngineError(f"generate: one adapter a prompt: {len(adapters)} for {len(prompts)} prompts")
        adapters = [adapter_name(model, a, "generate") for a in adapters]
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    stop = {int(t) for t in ([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or ())}
    greedy_graphs = not do_sample and cuda_graphs is not False and model.device.type == "cuda"
    engine = _engine_for(model, len(prompts), max(map(len, prompts)) + max_new_tokens, prefill_chunk, cuda_graphs)
    gen = None
    if do_sample and seed is not None:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(seed)
    slots = [engine.add(p, None if adapters is None else adapters[i]) for i, p in enumerate(prompts)]
    out: dict[int, list[int]] = {s: [] for s in slots}
    held: dict[int, int] = {}   # first tokens, fed once no prompt is left to prefill: the batch decodes together
    while engine.seqs:
        if held and not any(s.fed < len(s.tokens) for s in engine.seqs.values()):
            for slot, tok in held.items():
                engine.feed(slot, tok)
            held.clear()
        if greedy_graphs and engine.graphs is not None and all(
                s.fed == len(s.tokens) - 1 for s in engine.seqs.values()) and engine.graphs.blocker(len(engine.seqs)) is None:
            _greedy_loop(engine, out, max_new_tokens, stop)   # every sequence decodes: graphs feed themselves
            continue
        ready = engine.step()
        if not ready:
            continue
        order = sorted(ready)
        logits = torch.stack([ready[s] for s in order])
        draw = partial(sample, logits, temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                       generator=gen)
        # a model split over ranks (models/parallel.py): one rank draws, every rank feeds its tokens
        shared = getattr(model, "shared_tokens", None)
        nxt = (draw() if shared is None else shared(draw, len(order))).tolist()
        for slot, tok in zip(order, nxt):
            out[slot].append(tok)
            if tok in stop or len(out[slot]) >= max_new_tokens:
                engine.release(slot)
            elif len(out[slot]) == 1:
                held[slot] = tok
            else:
                engine.feed(slot, tok)
    return [out[s] for s in slots]


def _engine_for(model: DecoderModel, n: int, seq_len: int, prefill_chunk: int, cuda_graphs: bool | None) -> Engine:
    """The model's generation engine, kept between calls so that its cache and captured graphs
    are reused: rebuilt only when a call needs more sequences or a longer context than it has
    (then as large as both calls need, the context rounded up to whole pages: the cache never
    holds more than the largest call asked for) or other graph settings.
    `model.release_engine()` frees it."""
    want_graphs = model.device.type == "cuda" and cuda_graphs is not False and model.capturable(n)
    P = model.page_size
    seq_len = -(-seq_len // P) * P
    engine = getattr(model, "_engine", None)
    if engine is not None and (engine.seqs or engine.max_seqs < n or engine.max_seq_len < seq_len
                               or (engine.graphs is not None) != want_graphs):
        if not engine.seqs and (engine.graphs is not None) == want_graphs:   # grow to cover both calls
            n, seq_len = max(n, engine.max_seqs), max(seq_len, engine.max_seq_len)
        model.release_engine()
        engine = None
    if engine is None:
        engine = Engine(model, max_seqs=n, max_seq_len=seq_len, prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs)
        model._engine = engine
    engine.prefill_chunk = prefill_chunk
    return engine


def _greedy_loop(engine: Engine, out: dict[int, list[int]], max_new_tokens: int, stop: set[int]) -> None:
    """Greedy decoding of the engine's sequences (each with one token to feed) from self-feeding
    CUDA graphs: a step's tokens are read on the host while the next step runs, one step behind.
    A sequence that stops leaves after the step in flight (its extra token is dropped); then the
    batch changes and the next step starts from host tokens. Returns when every sequence is done."""
    graphs = engine.graphs
    pending = None    # (slots, pinned tokens, event) of the step whose tokens are not read yet
    while True:
        cur = sorted(engine.seqs)
        ahead = set(pending[0]) if pending else set()
        # (a batch whose step cannot replay, for its adapters' routes, returns to the caller's eager steps)
        launch = bool(cur) and (pending is None or pending[0] == cur) and all(
            len(out[s]) + (s in ahead) < max_new_tokens for s in cur) and graphs.blocker(len(cur)) is None
        nxt = None
        if launch:
            engine.cache.reserve(cur, [engine.seqs[s].fed + 1 for s in cur])
            toks = None if pending else [engine.seqs[s].tokens[-1] for s in cur]
            host, ev = graphs.decode_greedy(toks, cur, engine.adapter_slots(cur))
            for s in cur:
                engine.seqs[s].fed += 1
            nxt = (cur, host, ev)
        if pending is not None:
            p_slots, host, ev = pending
            ev.synchronize()
            for slot, tok in zip(p_slots, host.tolist()):
                if slot not in engine.seqs:
                    continue
                out[slot].append(tok)
                engine.seqs[slot].tokens.append(tok)
                engine.seqs[slot].new.append(tok)
                if tok in stop or len(out[slot]) >= max_new_tokens:
                    engine.release(slot)
        elif not launch:
            return
        pending = nxt
        if pending is not None and any(s not in engine.seqs for s in pending[0]):
            # a sequence left while a step ran for it: read that step, then go on from host tokens
            continue
