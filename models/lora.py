"""PEFT LoRA adapters on a DecoderModel, many at once, each token naming its own.

    model = lf.from_pretrained("path/to/Llama-3-8B", dtype=torch.bfloat16, device="cuda")
    adapters = attach_adapters(model, {"sql": "path/to/sql-lora", "chat": "path/to/chat-lora"})
    logits = adapters.forward(input_ids, ["sql", None])   # [B, S] prompts, an adapter a prompt (None: the base)
    with adapters.use(["sql"] * 3 + ["chat"] * 4):        # any step: each token's adapter (names, slots, None,
        logits = model.step(tokens, seq_ids, cache)       # or an int32 tensor of slots on the device, -1: none)
    adapters.detach()                                     # the model as it was

An adapter is a PEFT folder: `adapter_config.json` (r, lora_alpha, use_rslora, rank_pattern,
alpha_pattern) and `adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight` [r, in]
and `.lora_B.weight` [out, r]). Each adapter takes a slot (its position in the mapping), the same
in every projection; the projections any adapter targets become runtime/lora.LoRALinear modules
holding a MultiLoRA store, so decode steps run the base product with every slot's shrink folded
into it and the expand kernel (or the shrink and expand kernels), prefill the GEMM routes
(runtime/lora.py). Folding moves each projection's weight into a buffer with the adapters' A
rows after it (W is not kept twice); detach() gives the weights storages of their own again.
Quantise (DecoderModel.quantize_) before attaching: QuantLinear bases keep their kernels, with
the shrink kernel beside them. Where the model fuses transformers' projections, an adapter's modules
become slices of the fused one: q_proj, k_proj and v_proj the three row ranges of `attn.qkv`,
gate_proj and up_proj the halves of `mlp.gate_up`, each with its own A, B, rank and scale; a
fused module of the checkpoint (Phi-3's qkv_proj, GPT-NeoX's interleaved query_key_value) is one
slice whose B rows are reordered as the base weight's are. The mapping comes from the family's
checkpoint names (models/families.hf_names), so every dense family is served.

The model's fused decode layer (DecoderModel.fuses: the norms and residual adds inside the
small-token products) treats a projection as a bare weight, so attaching sets
`model.fused_decode = False` (detach() restores it): decode steps run the unfused layer, whose
projections are the LoRALinear modules. (LoRALinear also serves the fused path's keywords,
unfused, so turning it back on stays correct, only slower.)

Serving (models/engine.py): `Engine.add(prompt, adapter="sql")` and `generate(..., adapters=[...])`
keep an adapter a sequence and run each step under its tokens' slots; CUDA-graph decode steps
(models/graphs.py) read the slots from a static buffer of the graph, so one graph serves any mix.
The graphs hold the projections' pointers: attaching, detaching, and loading an adapter onto a
projection no adapter had yet change the modules and bump `adapter_stamp(model)`, which drops the
graphs already captured (loading into existing stores writes in place: the graphs stay valid).

Not served, each a clear error: DoRA, lora_bias, trained base biases (bias != "none"),
modules_to_save, trainable tokens, activated LoRA, target_parameters, adapters on the
embeddings, the LM head or MoE experts.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..runtime.lora import AdapterBatch, AdapterContext, LoRALinear, MultiLoRA, lora_scale, unfold
from .families import _PREFIX, _groups, _heads3, hf_names
from .model import DecoderModel
from .spec import ConfigError, ModelSpec

__all__ = ["PeftAdapter", "read_peft_adapter", "attach_adapters", "ModelAdapters", "projection_sources",
           "PEFT_PREFIX", "attached_adapters", "adapter_stamp"]

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."   # a PeftModel's prefix of the wrapped model's module names
_PROJECTIONS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.up", "mlp.down")
# adapter_config.json keys whose truthy values change what an adapter computes beyond A and B
_UNSERVED = {
    "use_dora": "DoRA (use_dora) rescales the adapted weight's columns",
    "lora_bias": "lora_B biases (lora_bias)",
    "modules_to_save": "full copies of modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}
_STAMPS = itertools.count(1)   # adapter_stamp's values: never reused, so no two module states share one


def attached_adapters(model: DecoderModel) -> "ModelAdapters | None":
    """The adapters attached to `model` (attach_adapters), or None."""
    return model.__dict__.get("_lora_adapters")


def adapter_stamp(model: DecoderModel) -> int:
    """A number that changes whenever adapters change `model`'s modules (attach, detach, a
    projection wrapped by load): CUDA graphs captured under another stamp read stale pointers.
    0 for a model adapters never touched."""
    return model.__dict__.get("_adapter_stamp", 0)


def _restamp(model: DecoderModel) -> None:
    model.__dict__["_adapter_stamp"] = next(_STAMPS)


@dataclass(frozen=True)
class PeftAdapter:
    """One PEFT LoRA adapter: per module of the transformers model (its name as named_modules()
    gives it, e.g. model.layers.0.self_attn.q_proj), lora_A [r, in] and lora_B [out, r], and the
    config's scaling."""
    name: str
    config: dict[str, Any] = field(compare=False)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(compare=False)

    def scale(self, module: str) -> float:
        """PEFT's scaling of `module`: lora_alpha (or its alpha_pattern entry) over r (the
        module's rank: rank_pattern's, as the tensors have it), or over sqrt(r) with use_rslora."""
        c = self.config
        alpha = c.get("lora_alpha", 8)
        for key, value in (c.get("alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):   # peft.utils.other.get_pattern_key's rule
                alpha = value
                break
        return lora_scale(float(alpha), self.modules[module][0].shape[0], rslora=bool(c.get("use_rslora", False)))

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())


def read_peft_adapter(folder: str | os.PathLike, name: str | None = None) -> PeftAdapter:
    """The adapter saved in `folder` by PeftModel.save_pretrained; ConfigError for what it cannot serve."""
    root = Path(folder)
    name = name or root.name
    if not (root / CONFIG).is_file():
        raise FileNotFoundError(f"{root}: no {CONFIG} (a PEFT adapter folder has it)")
    config = json.loads((root / CONFIG).read_text())
    if (root / WEIGHTS).is_file():
        from safetensors.torch import load_file
        tensors = load_file(str(root / WEIGHTS))
    else:
        other = [p.name for p in root.glob("adapter_model.*")]
        hint = f" (found {', '.join(other)}: save it with safe_serialization=True)" if other else ""
        raise FileNotFoundError(f"{root}: no {WEIGHTS}{hint}")
    return adapter_from_state_dict(name, config, tensors, where=str(root))


def adapter_from_state_dict(name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
                            where: str = "adapter") -> PeftAdapter:
    """A PeftAdapter from a config dict and get_peft_model_state_dict()'s tensors."""
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ConfigError(f"{where}: peft_type {kind!r}: only LoRA adapters are served")
    for key, what in _UNSERVED.items():
        if config.get(key):
            raise ConfigError(f"{where}: {what} is not served")
    if config.get("bias", "none") != "none":
        raise ConfigError(f"{where}: trained base biases (bias={config['bias']!r}) are not served")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ConfigError(f"{where}: tensor {key!r} is not a LoRA A or B weight (not served)")
        module = m.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m.group(2)] = t
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{where}: {module} has lora_{'A' if 'A' in ab else 'B'} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ConfigError(f"{where}: {module}'s lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain "
                              "([r, in] and [out, r])")
        modules[module] = (a, b)
    if not modules:
        raise ConfigError(f"{where}: no LoRA tensors")
    return PeftAdapter(name, dict(config), modules)


def projection_sources(spec: ModelSpec) -> dict[str, tuple[str, tuple[str, ...]]]:
    """A decoder layer's projections (canonical module names, e.g. layers.0.attn.qkv) -> (the
    family's recipe op, the transformers modules it is made from, one a slice for "cat")."""
    out = {}
    for canon, (op, names) in hf_names(spec).items():
        m = re.fullmatch(r"(layers\.\d+\.(.+))\.weight", canon)
        if m is None or m.group(2) not in _PROJECTIONS:
            continue
        out[m.group(1)] = (op, tuple(n.removesuffix(".weight") for n in names))
    return out


def _slices(spec: ModelSpec, proj: str, op: str, parts: int, out_features: int) -> tuple[int, ...]:
    if op != "cat" or parts == 1:
        return (out_features,)
    if proj.endswith("attn.qkv"):
        d = spec.head_dim
        return (spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d)
    return (out_features // parts,) * parts   # gate / up halves


def _reorder_b(spec: ModelSpec, op: str, b: torch.Tensor, module: str) -> torch.Tensor:
    """B's rows in the order the model's fused weight has them (the family's reordering)."""
    if op == "heads3":
        return _heads3(spec, b, module)
    if op == "groups":
        return _groups(spec, b, module)
    return b


class ModelAdapters:
    """The adapters attached to a model (attach_adapters): their slots, loading and unloading
    them, the per-step choice, detaching."""

    def __init__(self, model: DecoderModel, *, slots: int, rank: int):
        self.model, self.rank = model, rank
        self.slot_names: list[str | None] = [None] * slots
        self.context = AdapterContext(slots)
        self._modules: dict[str, tuple[torch.nn.Module, str, torch.nn.Module]] = {}   # projection -> (owner,
        self._fused_decode = model.fused_decode                                       # attribute, base module)
        spec = model.spec
        self._sources = projection_sources(spec)
        self._prefix = _PREFIX.get(spec.model_type, "model") + "."
        self._where = {mod: (proj, part if op == "cat" else 0, op)     # transformers module -> (projection,
                       for proj, (op, mods) in self._sources.items()   # slice, op)
                       for part, mod in enumerate(mods)}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in self.slot_names if n is not None)

    @property
    def modules(self) -> dict[str, LoRALinear]:
        """The LoRALinear modules, by projection."""
        return {p: getattr(owner, attr) for p, (owner, attr, _) in self._modules.items()}

    # ---- adapters ---------------------------------------------------------------------------
    def load(self, name: str, adapter: str | os.PathLike | PeftAdapter) -> int:
        """Load an adapter into the first free slot; returns the slot. Projections no adapter
        had yet become LoRALinear modules."""
        if name in self.slot_names:
            raise ValueError(f"load: an adapter named {name!r} is attached; unload it first")
        if None not in self.slot_names:
            raise ValueError(f"load: all {len(self.slot_names)} slots are taken (attach_adapters' slots=)")
        adapter = adapter if isinstance(adapter, PeftAdapter) else read_peft_adapter(adapter, name)
        spec = self.model.spec
        placed = []
        for mod in adapter.modules:
            hit = self._where.get(mod) or self._where.get(self._prefix + mod)
            if hit is None:
                raise ConfigError(f"adapter {name!r}: {mod} is not a projection of a {spec.model_type} decoder layer "
                                  f"that adapters are served on (attention q/k/v/o, the dense MLP's)")
            a, b = adapter.modules[mod]
            if a.shape[0] > self.rank:
                raise ConfigError(f"adapter {name!r}: {mod} has rank {a.shape[0]}, past the stores' {self.rank} "
                                  "(attach_adapters' max_rank=)")
            placed.append((mod, hit))
        slot = self.slot_names.index(None)
        for mod, (proj, part, op) in placed:
            lora = self._store(proj)
            a, b = adapter.modules[mod]
            dt = lora.lora_a.dtype
            try:
                lora.set_adapter(slot, a.to(dt), _reorder_b(spec, op, b, mod).to(dt), adapter.scale(mod), part=part)
            except ValueError as e:
                self._clear(slot)
                raise ConfigError(f"adapter {name!r}, {mod}: {e}") from None
        self.slot_names[slot] = name
        return slot

    def unload(self, name: str) -> None:
        """Free the adapter's slot (its projections compute nothing for it any more)."""
        slot = self.index(name)
        self._clear(slot)
        self.slot_names[slot] = None

    def _clear(self, slot: int) -> None:
        for lin in self.modules.values():
            lin.lora.clear_adapter(slot)

    def _store(self, proj: str) -> MultiLoRA:
        """The MultiLoRA of a projection, wrapping it on first use."""
        if proj in self._modules:
            owner, attr, _ = self._modules[proj]
            return getattr(owner, attr).lora
        owner_name, attr = proj.rsplit(".", 1)
        owner = self.model.get_submodule(owner_name)
        base = getattr(owner, attr)
        op, mods = self._sources[proj]
        lora = MultiLoRA(base.in_features, _slices(self.model.spec, proj, op, len(mods), base.out_features),
                         adapters=len(self.slot_names), max_rank=self.rank, dtype=self.model.dtype,
                         device=self.model.device)
        setattr(owner, attr, LoRALinear(base, lora, context=self.context))
        self._modules[proj] = (owner, attr, base)
        _restamp(self.model)
        return lora

    def index(self, name: str) -> int:
        if name not in self.slot_names:
            raise KeyError(f"no adapter {name!r} (attached: {', '.join(self.names) or 'none'})")
        return self.slot_names.index(name)

    def capture_blocker(self, tokens: int) -> str | None:
        """Why a step of `tokens` tokens with adapters cannot be captured in a CUDA graph (a
        projection's route reads back to the host: runtime/lora.MultiLoRA.capture_blocker), or
        None where every projection's can."""
        for proj, lin in self.modules.items():
            why = lin.lora.capture_blocker(tokens, self.model.dtype, self.model.device)
            if why is not None:
                return f"{proj}: {why}"
        return None

    # ---- steps ------------------------------------------------------------------------------
    def token_ids(self, adapters: Sequence[str | int | None] | torch.Tensor) -> torch.Tensor:
        """int32 [T] slots on the model's device: a name, a slot or None (-1: no adapter) a token."""
        if isinstance(adapters, torch.Tensor):
            return adapters.to(device=self.model.device, dtype=torch.int32)
        ids = [-1 if a is None else self.index(a) if isinstance(a, str) else int(a) for a in adapters]
        return torch.tensor(ids, dtype=torch.int32, device=self.model.device)

    @contextlib.contextmanager
    def use(self, adapters: Sequence[str | int | None] | torch.Tensor | None) -> Iterator[AdapterBatch | None]:
        """Steps inside run each token with its adapter (token_ids' forms; None: the base model for
        every token). The choice is made once here for every projection of the step; an int32
        tensor on the device keeps the step capturable (what the routes need is computed at first
        use: enter this inside a CUDA graph capture to capture it too)."""
        prev = self.context.batch
        self.context.batch = None if adapters is None else AdapterBatch(self.token_ids(adapters), self.context.slots)
        try:
            yield self.context.batch
        finally:
            self.context.batch = prev

    def step(self, tokens: torch.Tensor, seq_ids, cache, *, adapters, **kwargs) -> torch.Tensor:
        """DecoderModel.step with each token's adapter (use()'s forms, one a token)."""
        with self.use(adapters):
            return self.model.step(tokens, seq_ids, cache, **kwargs)

    def forward(self, input_ids: torch.Tensor, adapters: Sequence[str | int | None]) -> torch.Tensor:
        """DecoderModel.forward ([B, S] prompts -> [B, S, V] logits) with an adapter a prompt."""
        if input_ids.dim() != 2 or len(adapters) != input_ids.shape[0]:
            raise ValueError(f"forward: one adapter a prompt: {len(adapters)} for input_ids {list(input_ids.shape)}")
        per_seq = self.token_ids(list(adapters))
        with self.use(per_seq.repeat_interleave(input_ids.shape[1])):
            return self.model(input_ids)

    def detach(self) -> None:
        """Put the base projections back (their weights in storages of their own again) and restore
        fused_decode."""
        for owner, attr, base in self._modules.values():
            setattr(owner, attr, base)
            if isinstance(base, torch.nn.Linear):
                unfold(base)
        if self._modules:
            _restamp(self.model)
        self._modules = {}
        self.model.fused_decode = self._fused_decode
        self.model.__dict__.pop("_lora_adapters", None)


def attach_adapters(model: DecoderModel, adapters: Mapping[str, str | os.PathLike | PeftAdapter], *,
                    slots: int | None = None, max_rank: int | None = None) -> ModelAdapters:
    """Load PEFT adapters (folders, or PeftAdapter values) onto `model`, in slots 0, 1, ... in the
    mapping's order. slots: room for more (ModelAdapters.load; default: as many as given);
    max_rank: the stores' rank (default: the largest adapter's). Sets model.fused_decode = False
    (the module's docstring)."""
    if model.__dict__.get("_lora_adapters") is not None:
        raise ValueError("attach_adapters: this model has adapters attached; detach() them first")
    loaded = {n: a if isinstance(a, PeftAdapter) else read_peft_adapter(a, n) for n, a in adapters.items()}
    if not loaded:
        raise ValueError("attach_adapters: no adapters")
    slots = len(loaded) if slots is None else slots
    if slots < len(loaded):
        raise ValueError(f"attach_adapters: {len(loaded)} adapters do not fit {slots} slots")
    attached = ModelAdapters(model, slots=slots,
                             rank=max(a.max_rank for a in loaded.values()) if max_rank is None else max_rank)
    try:
        for name, adapter in loaded.items():
            attached.load(name, adapter)
    except Exception:
        attached.detach()
        raise
    model.fused_decode = False
    model.__dict__["_lora_adapters"] = attached
    return attached
