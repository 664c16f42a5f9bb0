"""The front door of the DSL: load source (files, text or the standard library), check it,
and specialise a definition into a typed, verified IR function."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from . import ast
from .checker import Bindings, Checker, ModuleInfo
from .errors import Diagnostic, DiagnosticSink, DSLError
from .ir import Function, verify
from .numerics import RopeParameterError, as_rope_scaling, rope_scaling_from_hf
from .parser import parse
from .source import SourceFile, Span
from .types import DType, parse_dtype

# Hugging Face config keys -> DSL names (dims and const parameters) used by the standard library.
HF_CONFIG_NAMES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("H",),
    "intermediate_size": ("F",),
    "moe_intermediate_size": ("F",),
    "num_attention_heads": ("Hq",),
    "num_key_value_heads": ("Hkv",),
    "head_dim": ("D",),
    "num_local_experts": ("E",),
    "num_experts": ("E",),
    "n_routed_experts": ("E",),
    "num_experts_per_tok": ("k",),
    "rope_theta": ("theta",),
    "sliding_window": ("window",),
    "attn_logit_softcapping": ("softcap",),
    "norm_topk_prob": ("renormalize",),
    "query_pre_attn_scalar": ("query_scalar",),
    "state_size": ("NS",),        # Mamba's SSM state size (dsl/stdlib/ssm.lf)
    "conv_kernel": ("KW",),       # Mamba's causal conv width
    "routed_scaling_factor": ("scaling",),
}


# Llama 3's RoPE frequency scaling (rope_type "llama3"): config key -> the stdlib's const
LLAMA3_ROPE_NAMES = {
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_position",
}
# the binding of a config's other RoPE scalings (linear, yarn, longrope, dynamic): its
# rope_parameters and max_position_embeddings, read by dsl/numerics at specialisation
ROPE_SCALING = "rope_scaling"


def dims_from_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """Read a model's config.json (dict or path) into DSL bindings: dims and const parameters.

    A config whose model_type the family registry knows (models/families.py) binds what its
    ModelSpec says: dims, the attention consts every layer shares (window 0: none), the model's
    RoPE scaling and `eps` (the norms' runtime scalar); a config it cannot serve is a
    ConfigError (a ValueError) naming the key. Other configs are read through HF_CONFIG_NAMES."""
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        config = json.loads(Path(config).read_text())
    cfg = dict(config)
    if "text_config" in cfg and isinstance(cfg["text_config"], Mapping):
        cfg = {**cfg, **cfg["text_config"]}
    from ..models import families   # models.families imports no dsl module at import time
    if cfg.get("model_type") in families.FAMILIES:
        return families.bindings_from_spec(families.spec_from_config(cfg))
    # transformers 5 keeps RoPE settings in `rope_parameters` (older configs: `rope_scaling`)
    out: dict[str, Any] = {}
    for nested in ("rope_parameters", "rope_scaling"):
        sub = cfg.get(nested)
        if not isinstance(sub, Mapping):
            continue
        if sub.get("rope_theta") is not None:
            cfg.setdefault("rope_theta", sub["rope_theta"])
        kind = sub.get("rope_type", sub.get("type"))
        if kind == "llama3":
            for key, name in LLAMA3_ROPE_NAMES.items():
                if sub.get(key) is not None:
                    out.setdefault(name, sub[key])
        elif kind not in (None, "default"):
            out.setdefault(ROPE_SCALING, (dict(sub), cfg.get("max_position_embeddings")))
    for key, names in HF_CONFIG_NAMES.items():
        if cfg.get(key) is not None:
            for n in names:
                out.setdefault(n, cfg[key])
    if "Hq" in out:
        out.setdefault("Hkv", out["Hq"])
        if "H" in out:
            out.setdefault("D", out["H"] // out["Hq"])
    return out


@dataclass(frozen=True)
class Layer:
    """A definition specialised for one model: its IR function and the bindings used."""

    function: Function
    dims: tuple[tuple[str, int], ...]
    dtype: DType | None
    consts: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return self.function.name


class Program:
    """A checked set of DSL definitions (one or more files)."""

    def __init__(self, files: list[SourceFile]):
        self.sources = {f.name: f for f in files}
        sink = DiagnosticSink()
        items: list = []
        for f in files:
            try:
                items.extend(parse(f.text, f.name).items)
            except DSLError as e:
                sink.items.extend(e.diagnostics)
        sink.raise_if_any(self.sources)
        # Later files shadow earlier definitions of the same name (user code over the stdlib).
        # Calls from the files loaded before the shadowing one keep the definition they were
        # written against (the stdlib's add_rms_norm calls the stdlib's rms_norm), so a user's
        # rms_norm of another signature breaks nothing there and its errors stay in its file.
        last: dict[str, Any] = {}
        shadowed: dict[str, tuple[Any, frozenset[str]]] = {}
        order = [f.name for f in files]
        for it in items:
            if isinstance(it, (ast.LayerDef, ast.AttentionDef)):
                if it.name in last and last[it.name].span.file != it.span.file:
                    items = [x for x in items if x is not last[it.name]]
                    before = frozenset(order[:order.index(it.span.file)]) if it.span.file in order else frozenset()
                    shadowed[it.name] = (last[it.name], before)
                last[it.name] = it
        self.ast = ast.Program(Span("<program>", 1, 1, 1, 1), tuple(items))
        self.info = ModuleInfo(self.ast, sink, shadowed)
        sink.raise_if_any(self.sources)
        self._generic: dict[str, Function] = {}
        self.check()

    # ---- construction
    @classmethod
    def from_source(cls, text: str, file: str = "<string>", *, with_stdlib: bool = False) -> "Program":
        files = stdlib_sources() if with_stdlib else []
        return cls(files + [SourceFile(file, text)])

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, with_stdlib: bool = False) -> "Program":
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DSLError([_file_diag(str(p), f"file is not UTF-8 text ({e.reason} at byte {e.start})")]) from None
        except OSError as e:
            raise DSLError([_file_diag(str(p), f"cannot read file: {e.strerror}")]) from None
        return cls.from_source(text, str(p), with_stdlib=with_stdlib)

    @classmethod
    def stdlib(cls) -> "Program":
        return cls(stdlib_sources())

    # ---- queries
    @property
    def names(self) -> list[str]:
        return list(self.info.defs)

    def definition(self, name: str):
        if name not in self.info.defs:
            import difflib
            close = difflib.get_close_matches(name, self.names, n=3)
            raise KeyError(f"no layer or attention named '{name}'"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
        return self.info.defs[name]

    def check(self) -> None:
        """Type-check every definition generically; raise DSLError listing all errors."""
        sink = DiagnosticSink()
        ck = Checker(self.info, sink)
        for name in self.info.defs:
            fn = ck.build(name)
            if fn is not None and not sink:
                verify(fn)
                self._generic[name] = fn
        sink.raise_if_any(self.sources)

    def const_params(self, name: str) -> list[str]:
        return [p.name for p in self.definition(name).params if p.is_const]

    def bindings_for(self, name: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of `values` (e.g. a whole model's config) that `name` can take: static
        dims and its const parameters."""
        consts = set(self.const_params(name)) | {ROPE_SCALING}
        return {k: v for k, v in values.items() if k in self.info.static_dims or k in consts}

    def specialise(self, name: str, *, dims: Mapping[str, int] | None = None, dtype: str | DType | None = None,
                   config: Mapping[str, Any] | str | None = None, **kwargs: Any) -> Layer:
        """Bind dims, the dtype parameter T and const parameters, and re-check with numbers.

        `config` is a model config (dict or config.json path) read through HF_CONFIG_NAMES;
        explicit `dims` and keyword arguments override it. Keyword arguments may name dims or
        const parameters. Dynamic dims (token counts) stay symbolic and bind at run time.
        """
        d = self.definition(name)
        values: dict[str, Any] = dims_from_config(config) if config is not None else {}
        given_explicitly = dict(dims or {}) | kwargs
        values.update(given_explicitly)
        rope_scaling = self._rope_scaling(d, values.pop(ROPE_SCALING, None), values.pop("rope_regime", None))
        given_explicitly.pop(ROPE_SCALING, None)
        given_explicitly.pop("rope_regime", None)
        if isinstance(dtype, str):
            dtype = parse_dtype(dtype)
        consts = {p.name for p in d.params if p.is_const}
        bound_dims: dict[str, int] = {}
        bound_consts: dict[str, Any] = {}
        for k, v in values.items():
            if k in consts:
                bound_consts[k] = v
            elif k in self.info.static_dims:
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise DSLError([Diagnostic(self.info.static_dims[k].span,
                                               f"dim '{k}' must be bound to a positive integer, got {v!r}")],
                                   self.sources)
                bound_dims[k] = int(v)
            elif k in self.info.dynamic_dims:
                if k in given_explicitly:
                    raise ValueError(f"'{k}' is a dynamic dim: it is bound at run time from the inputs' shapes")
            elif k in given_explicitly:
                raise ValueError(f"'{name}' has no dim or const parameter named '{k}' (dims: "
                                 f"{', '.join(sorted(self.info.static_dims))}; consts: "
                                 f"{', '.join(sorted(consts)) or 'none'})")
        used = _used_dims(self._generic[name]) if name in self._generic else set(bound_dims)
        # the checker gets every dim given (a dim the generic check folded away, as in `NB - NB`,
        # is still named in the source); the key names only the dims the function uses
        all_dims = bound_dims
        bound_dims = {k: v for k, v in bound_dims.items() if k in used}
        sink = DiagnosticSink()
        ck = Checker(self.info, sink)
        fn = ck.build(name, Bindings(all_dims, dtype, bound_consts, rope_scaling))
        sink.raise_if_any(self.sources)
        assert fn is not None
        if rope_scaling is not None and _rotates(d) and not _applies(fn, rope_scaling) \
                and not _own_llama3(bound_consts, rope_scaling):
            raise DSLError([Diagnostic(d.name_span, f"the model's RoPE scaling '{rope_scaling.rope_type}' is not "
                                                    f"applied by '{name}', which rotates by position (its "
                                                    "frequencies are plain theta or llama3 consts)")], self.sources)
        verify(fn)
        if dtype is None and _uses_T(fn):
            raise ValueError(f"'{name}' has the dtype parameter T: pass dtype='bf16' (or f16, f32)")
        return Layer(fn, tuple(sorted(bound_dims.items())), dtype, tuple(sorted(bound_consts.items(), key=str)))


    def _rope_scaling(self, d, binding, regime):
        """The model's RoPE scaling (dsl/numerics) from a config's binding or an explicit one;
        errors point at the definition, and only definitions that rotate care."""
        if binding is None or not _rotates(d):
            return None
        try:
            if isinstance(binding, tuple):   # (rope_parameters, max_position_embeddings) of a config
                return rope_scaling_from_hf(binding[0], binding[1], longrope_regime=regime)
            return as_rope_scaling(binding)
        except RopeParameterError as e:
            raise DSLError([Diagnostic(d.name_span, f"the model's RoPE scaling: {e}")], self.sources) from None


def _rotates(d) -> bool:
    """A definition that rotates by position: an attention block with rope(...), or a layer
    with a const theta (the stdlib's rope rows)."""
    if isinstance(d, ast.AttentionDef):
        return any(isinstance(st, ast.AttnCall) and st.name == "rope" for st in d.body)
    return any(p.is_const and p.name == "theta" for p in d.params)


def _applies(fn: Function, scaling) -> bool:
    from .ir import Op
    return any(n.op is Op.ATTENTION and n.arg.rope is not None and n.arg.rope.scaling == scaling for n in fn.nodes())


def _own_llama3(consts: Mapping[str, Any], scaling) -> bool:
    """A definition whose llama3 rope consts (LLAMA3_ROPE_NAMES, as a config binds them) give the
    model's llama3 scaling: it applies it itself (the rope_llama3 row)."""
    if getattr(scaling, "rope_type", None) != "llama3" or not all(n in consts for n in LLAMA3_ROPE_NAMES.values()):
        return False
    fields = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
              "high_freq_factor": "rope_high_freq_factor", "original_max_position": "rope_original_max_position"}
    return all(float(getattr(scaling, f)) == float(consts[n]) for f, n in fields.items())


def _used_dims(fn: Function) -> set[str]:
    """Names of the dims a (generic) function mentions anywhere."""
    import sympy
    from .ir import Op
    exprs = [d for p in fn.params for d in p.shape]
    stack = list(fn.nodes())
    while stack:
        n = stack.pop()
        exprs.extend(n.shape)
        if n.op is Op.DIM:
            exprs.append(n.arg)
        elif n.op is Op.ATTENTION:
            spec = n.arg
            exprs += [spec.num_q_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim]
            if spec.rope is not None:
                exprs.append(spec.rope.rotary_dim)
            from .ir import toposort
            for g in (spec.scale, spec.score, spec.mask):
                if g is not None:
                    stack.extend(toposort([g]))
        elif isinstance(n.arg, tuple):
            exprs.extend(a for a in n.arg if isinstance(a, sympy.Basic))
    return {s.name for e in exprs if isinstance(e, sympy.Basic) for s in e.free_symbols}


def _uses_T(fn: Function) -> bool:
    return any(p.dtype is DType.T for p in fn.params) or any(n.dtype is DType.T for n in fn.nodes())



def _file_diag(path: str, msg: str) -> Diagnostic:
    return Diagnostic(Span(path, 0, 0, 0, 0), msg)


def stdlib_sources() -> list[SourceFile]:
    root = resources.files("layerforge.dsl.stdlib")
    files = sorted((p for p in root.iterdir() if p.name.endswith(".lf")), key=lambda p: p.name)
    return [SourceFile(f"<stdlib>/{p.name}", p.read_text(encoding="utf-8")) for p in files]


def located(span: Span, what: str) -> str:
    """`file:line:col: what`, with the source line and a caret where the source can be read (the
    standard library's, a file's; not a string's, which a Layer does not keep): how a stage after
    the checker (lowering) points at the expression it cannot serve."""
    source = None
    if span.file.startswith("<stdlib>/"):
        source = next((s for s in stdlib_sources() if s.name == span.file), None)
    elif span.line > 0:
        try:
            with open(span.file, encoding="utf-8") as f:
                source = SourceFile(span.file, f.read())
        except OSError:
            source = None
    return Diagnostic(span, what).format(source).replace(": error: ", ": ", 1)
