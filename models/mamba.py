"""State-space language models, Mamba and Mamba2 (model_type mamba and mamba2): the embedding,
blocks of RMSNorm + mixer (runtime/mamba.py) with a residual, the final norm and the LM head,
as transformers' MambaForCausalLM / Mamba2ForCausalLM compute them; a state cache (one slot
per sequence) in place of a KV cache.

    model = lf.from_pretrained("path/to/mamba-130m-hf", dtype=torch.bfloat16, device="cuda")   # a MambaModel
    model.generate([[1, 2, 3], [4, 5]], max_new_tokens=32)      # greedy; do_sample, top_k, top_p, seed
    cache = model.make_cache(max_seqs=8)                        # runtime/mamba.MambaStateCache
    cache.allocate(0)
    logits = model.step(ids, [0] * 7, cache)                    # prefill 7 tokens of sequence 0: [1, V]
    logits = model.step(next_ids, [0], cache)                   # decode: the states advance in place

Canonical tensor names (MambaModel.state_dict(); the mixers' are transformers'):

    embed.weight                         [V, H]
    layers.{i}.norm.weight               [H]
    layers.{i}.mixer.*                   MambaMixer: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj
                                         Mamba2Mixer: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj
    final_norm.weight                    [H]
    lm_head.weight                       [V, H]     absent when tie_word_embeddings

A step takes the new tokens of one or more sequences (grouped by sequence, in order) and runs
the sequences with the same number of tokens in it as one batch: a prompt chunk (the mixers'
prefill, continuing from the sequence's states) or one decode token each. A decode step over
slots 0..B-1 reads and updates the cache's rows in place and can be captured in a CUDA graph
(DecodeGraph: generate() replays one on a GPU); other slot sets are gathered and written back.

As transformers does, with residual_in_fp32 (every released checkpoint) the residual stream
is float32: each block's norm reads it rounded to the model's dtype, the final norm reads it
in float32 (its kernel runs in float32) and the LM head reads the normed rows rounded back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..dsl.program import Program
from ..runtime.embedding import Embedding
from ..runtime.layers import _dtype_name
from ..runtime.linear import Linear, gemv
from ..runtime.mamba import (Mamba2Mixer, Mamba2MixerConfig, MambaMixer, MambaMixerConfig, MambaStateCache,
                             MixerState)
from .engine import sample
from .families import canonical_state_dict
from .model import LanguageModelWeights, Norm, _torch_dtype
from .spec import ConfigError

__all__ = ["MambaSpec", "MambaModel", "MambaBlock", "DecodeGraph", "load_mamba"]


@dataclass(frozen=True, kw_only=True)
class MambaSpec:
    """A Mamba or Mamba2 model (models/families.py reads it from a transformers config): sizes,
    the norms' eps (layer_norm_epsilon), the mixer's config, and whether the residual stream is
    float32 (residual_in_fp32)."""
    model_type: str                 # "mamba" or "mamba2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    norm_eps: float
    mixer: MambaMixerConfig | Mamba2MixerConfig
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def canonical_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every canonical tensor's shape (the module docstring's names)."""
        H, V, m = self.hidden_size, self.vocab_size, self.mixer
        out: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
        if isinstance(m, MambaMixerConfig):
            D, N, R, K = m.intermediate_size, m.state_size, m.time_step_rank, m.conv_kernel
            mixer = {"in_proj.weight": (2 * D, H), "conv1d.weight": (D, 1, K), "x_proj.weight": (R + 2 * N, D),
                     "dt_proj.weight": (D, R), "dt_proj.bias": (D,), "A_log": (D, N), "D": (D,),
                     "out_proj.weight": (H, D)}
            inner = D
        else:
            I, C, Hh = m.intermediate_size, m.conv_dim, m.num_heads
            mixer = {"in_proj.weight": (I + C + Hh, H), "conv1d.weight": (C, 1, m.conv_kernel), "dt_bias": (Hh,),
                     "A_log": (Hh,), "D": (Hh,), "norm.weight": (I,), "out_proj.weight": (H, I)}
            inner = C
        if m.use_bias:
            mixer.update({"in_proj.bias": (mixer["in_proj.weight"][0],), "out_proj.bias": (H,)})
        if m.use_conv_bias:
            mixer["conv1d.bias"] = (inner,)
        for i in range(self.num_layers):
            out[f"layers.{i}.norm.weight"] = (H,)
            out.update({f"layers.{i}.mixer.{k}": v for k, v in mixer.items()})
        out["final_norm.weight"] = (H,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (V, H)
        return out


class MambaBlock(torch.nn.Module):
    """transformers' MambaBlock / Mamba2Block: residual + mixer(norm(residual)); the norm reads the
    residual in the model's dtype."""

    def __init__(self, spec: MambaSpec, *, program: Program, dtype: str, device=None):
        super().__init__()
        td = _torch_dtype(dtype)
        self.norm = Norm("rms", spec.hidden_size, spec.norm_eps, bias=False, program=program, dtype=dtype, device=device)
        mixer_cls = MambaMixer if isinstance(spec.mixer, MambaMixerConfig) else Mamba2Mixer
        self.mixer = mixer_cls(spec.mixer, dtype=td, device=device)
        self.dtype = td

    def forward(self, residual: torch.Tensor, state: MixerState, decode: bool) -> torch.Tensor:
        b, L, H = residual.shape
        h = self.norm(residual.to(self.dtype).reshape(b * L, H)).view(b, L, H)
        out = self.mixer.step(h, state) if decode else self.mixer(h, state)
        return residual + out     # float32 with a float32 residual, as transformers promotes it


class MambaModel(LanguageModelWeights, torch.nn.Module):
    """A Mamba / Mamba2 language model from a MambaSpec (see the module docstring)."""

    def __init__(self, spec: MambaSpec, *, dtype: torch.dtype | str = torch.bfloat16, device=None,
                 program: Program | None = None):
        super().__init__()
        if not isinstance(spec, MambaSpec):
            raise TypeError(f"MambaModel takes a MambaSpec (a mamba or mamba2 config), not a {type(spec).__name__}")
        self.spec = spec
        dname = _dtype_name(dtype)
        td = _torch_dtype(dname)
        prog = program or Program.stdlib()
        H = spec.hidden_size
        self.embed = Embedding(spec.vocab_size, H, dname, device=device, program=prog)
        self.layers = torch.nn.ModuleList(MambaBlock(spec, program=prog, dtype=dname, device=device)
                                          for _ in range(spec.num_layers))
        # transformers norms the float32 residual stream in float32 (residual_in_fp32)
        self.final_norm = Norm("rms", H, spec.norm_eps, bias=False, program=prog,
                               dtype="f32" if spec.residual_in_fp32 else dname, device=device)
        self.lm_head = None if spec.tie_word_embeddings else Linear(H, spec.vocab_size, bias=False, dtype=td,
                                                                     device=device)

    def capturable(self, tokens: int) -> bool:
        """Whether a decode step can be captured in a CUDA graph: on a GPU, always (its kernels
        read nothing back to the host)."""
        return self.device.type == "cuda"

    # ---- cache --------------------------------------------------------------------------
    def make_cache(self, *, max_seqs: int) -> MambaStateCache:
        mixer = self.layers[0].mixer
        return MambaStateCache(num_layers=self.spec.num_layers, max_seqs=max_seqs, conv_shape=mixer.conv_shape,
                               ssm_shape=mixer.ssm_shape, dtype=self.dtype, device=self.device)

    # ---- forward ------------------------------------------------------------------------
    def _run(self, tokens: torch.Tensor, cache: MambaStateCache, slots: list[int], *, last_only: bool,
             index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of a batch: tokens [b, L] of sequences `slots` (checked), L of each; the
        states continue from the cache's and are left there. [b, V] of the last tokens
        (last_only) or [b, L, V]."""
        b, L = tokens.shape
        x = self.embed(tokens)
        residual = x.float() if self.spec.residual_in_fp32 else x
        if index is None and not cache.consecutive(slots):
            index = torch.tensor(slots, dtype=torch.long, device=cache.device)
        for i, layer in enumerate(self.layers):
            state = cache.states(i, slots, index)
            residual = layer(residual, state, decode=L == 1)
            cache.commit(i, slots, state, index)
        if last_only:
            residual = residual[:, -1].contiguous()   # the norm kernel takes contiguous rows
        h = self.final_norm(residual.reshape(-1, self.spec.hidden_size)).to(self.dtype)
        logits = gemv(h, self.head_weight())
        return logits.view(b, self.spec.vocab_size) if last_only else logits.view(b, L, self.spec.vocab_size)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, seq_ids, cache: MambaStateCache, *, logits: str = "last") -> torch.Tensor:
        """Run one step: tokens [T] (ids on the model's device) of sequences seq_ids [T] (host
        ints, each sequence's tokens together and in order). Returns the logits of each
        sequence's last token, in order of appearance ([num_seqs, V]), or of every token
        (`logits="all"`, [T, V])."""
        if logits not in ("last", "all"):
            raise ValueError(f"step: logits must be 'last' or 'all', got {logits!r}")
        ids = [int(s) for s in seq_ids]
        if tokens.shape != (len(ids),) or not ids:
            raise ValueError(f"step: tokens must have shape [{len(ids)}] (one per seq_ids entry, at least one), "
                             f"got {list(tokens.shape)}")
        if not isinstance(cache, MambaStateCache):
            raise TypeError(f"step: a {self.spec.model_type} model steps over the MambaStateCache of make_cache(), "
                            f"not a {type(cache).__name__}")
        order: list[int] = []          # sequences in order of appearance
        first: dict[int, int] = {}     # each one's first row
        for t, s in enumerate(ids):
            if s not in first:
                first[s] = t
                order.append(s)
            elif ids[t - 1] != s:
                raise ValueError(f"step: the tokens of sequence {s} must be together (grouped by sequence)")
        cache.check(order)
        counts = {s: 0 for s in order}
        for s in ids:
            counts[s] += 1
        batches: dict[int, list[int]] = {}   # tokens -> the sequences with that many, in order
        for s in order:
            batches.setdefault(counts[s], []).append(s)
        out_rows = len(order) if logits == "last" else len(ids)
        if len(batches) == 1:          # one batch, rows already in sequence order: no gather
            (L, slots), = batches.items()
            res = self._run(tokens.view(len(slots), L), cache, slots, last_only=logits == "last")
            cache.advance(slots, [L] * len(slots))
            return res.reshape(out_rows, -1)
        result = None
        for L, slots in batches.items():
            rows = torch.tensor([[first[s] + j for j in range(L)] for s in slots], dtype=torch.long,
                                device=tokens.device)
            res = self._run(tokens[rows], cache, slots, last_only=logits == "last")
            if result is None:
                result = torch.empty(out_rows, res.shape[-1], dtype=res.dtype, device=res.device)
            if logits == "last":
                where = torch.tensor([order.index(s) for s in slots], dtype=torch.long, device=res.device)
                result[where] = res
            else:
                result[rows.reshape(-1).to(res.device)] = res.reshape(-1, res.shape[-1])
            cache.advance(slots, [L] * len(slots))
        return result

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every position of a batch of prompts [B, S] (fresh states, none kept): [B, S, V]."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, seq >= 1], got shape {list(input_ids.shape)}")
        B, S = input_ids.shape
        cache = self.make_cache(max_seqs=B)
        for b in range(B):
            cache.allocate(b)
        return self._run(input_ids.to(self.device), cache, list(range(B)), last_only=False)

    # ---- generation ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts, *, max_new_tokens: int, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, stop_tokens=(), seed: int | None = None,
                 cuda_graphs: bool | None = None) -> list[list[int]]:
        """New tokens for each prompt (lists of token ids, or a [B, S] tensor), generated together:
        greedy, or sampled (do_sample with temperature, top_k, top_p, seed: models/engine.sample);
        a stop token ends its sequence (and is its last new token). Prompts of equal length
        prefill as one batch; then all of them decode together, a step per token (a CUDA graph
        replay on a GPU unless cuda_graphs=False), until each has max_new_tokens or stopped
        (finished sequences ride along until the last one is done: the batch stays the graph's)."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        prompts = [[int(t) for t in p] for p in prompts]
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        V = self.spec.vocab_size
        for p in prompts:
            if not p:
                raise ValueError("generate: a prompt is empty")
            bad = [t for t in p if not 0 <= t < V]
            if bad:
                raise ValueError(f"generate: token id {bad[0]} is outside the vocabulary [0, {V})")
        if not prompts or max_new_tokens == 0:
            return [[] for _ in prompts]
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("generate: cuda_graphs needs the model on a CUDA device")
        stop = {int(t) for t in ([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or ())}
        n = len(prompts)
        cache = self.make_cache(max_seqs=n)
        for i in range(n):
            cache.allocate(i)
        gen = None
        if do_sample and seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample(logits, temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                          generator=gen)

        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.int32, device=self.device)
        nxt = pick(self.step(flat, [i for i, p in enumerate(prompts) for _ in p], cache))
        graph = DecodeGraph(self, cache, n) if self.capturable(n) and cuda_graphs is not False else None
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * n
        while True:
            for i, tok in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(tok)
                    done[i] = tok in stop or len(out[i]) >= max_new_tokens
            if all(done):
                return out
            logits = graph.decode(nxt) if graph is not None else self.step(nxt.to(torch.int32), range(n), cache)
            nxt = pick(logits)


class DecodeGraph:
    """A decode step of sequences 0..batch-1 of a state cache as one CUDA graph: embedding,
    every block (the cache's rows read and updated in place), final norm and LM head. The
    kernels are loaded by a warm-up step over a scratch cache of the same shape (so the real
    states are untouched) before the capture."""

    def __init__(self, model: MambaModel, cache: MambaStateCache, batch: int):
        if cache.device.type != "cuda":
            raise ValueError("DecodeGraph needs a CUDA cache")
        if not 1 <= batch <= cache.max_seqs:
            raise ValueError(f"DecodeGraph: batch {batch} must be in [1, max_seqs={cache.max_seqs}]")
        self.model, self.cache, self.batch = model, cache, batch
        self.slots = list(range(batch))
        self.tokens = torch.zeros(batch, 1, dtype=torch.int32, device=cache.device)
        scratch = model.make_cache(max_seqs=cache.max_seqs)
        model._run(self.tokens, scratch, self.slots, last_only=True)       # loads every kernel
        torch.cuda.synchronize(cache.device)
        del scratch
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model._run(self.tokens, cache, self.slots, last_only=True)
        self.replays = 0

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step of the batch's sequences (their slots allocated): tokens [batch] on any
        device. Returns the logits [batch, V] (the graph's output: valid until the next replay)."""
        if tokens.shape != (self.batch,):
            raise ValueError(f"decode: tokens must be [{self.batch}], got {list(tokens.shape)}")
        self.cache.check(self.slots)
        self.tokens.copy_(tokens.view(self.batch, 1), non_blocking=True)
        self.graph.replay()
        self.cache.advance(self.slots, [1] * self.batch)
        self.replays += 1
        return self.logits


def load_mamba(spec: MambaSpec, tensors: dict[str, torch.Tensor], config: dict, *,
               dtype: torch.dtype | str = torch.bfloat16, device: torch.device | str | None = None,
               program: Program | None = None) -> MambaModel:
    """A MambaModel with a transformers checkpoint's tensors (models/loading.py's from_pretrained
    reads the folder and sends mamba and mamba2 configs here)."""
    if config.get("quantization_config") is not None:
        raise ConfigError(f"config.json: a quantised {spec.model_type} checkpoint is not served")
    weights = canonical_state_dict(spec, tensors)
    model = MambaModel(spec, dtype=dtype, device=torch.device(device) if device is not None else torch.device("cpu"),
                       program=program)
    model.load_state_dict(weights, strict=True)
    return model.eval()
