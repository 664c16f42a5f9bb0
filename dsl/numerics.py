"""Position-encoding numbers, in float64: the one place that knows the formulas.

The reference (dsl/attention_ref.py, dsl/evaluator.py), the kernels' tables (codegen/) and the
KV cache's torch path all take their numbers from here:

    rope_inv_freq(theta, rotary_dim, scaling)    # [rotary_dim / 2] inverse frequencies
    rope_attention_factor(scaling)               # the factor cos/sin are multiplied by
    alibi_slopes(num_heads, max_bias)            # one slope per head (BLOOM's rule)
    t5_relative_bucket(rel, ...)                 # T5's relative-position buckets

RoPE scalings follow the rope types of Hugging Face transformers (`rope_parameters` of a
config): default (None here), linear, dynamic (NTK), yarn, longrope and llama3. Two of them
depend on the sequence length: dynamic NTK changes its base once a sequence outgrows the
pretraining length, and LongRoPE switches from its short to its long factors there. Kernels
carry one constant table, so `static_inv_freq` refuses dynamic NTK, and LongRoPE is static
only with its regime ("short" or "long") fixed at build time; `rope_inv_freq(..., seq_len=)`
gives the length-dependent numbers of both.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar, Mapping

from types import ModuleType


class _LazyTorch(ModuleType):
    """torch, imported at first use: the checker uses this module's constants and RoPE rules,
    and `layerforge check` / `list` should not pay torch's import (seconds)."""

    def __getattr__(self, name: str):
        import torch as _torch
        globals()["torch"] = _torch
        return getattr(_torch, name)


torch = _LazyTorch("torch")


def __getattr__(name: str):   # F64 (torch.float64), without importing torch on import
    if name == "F64":
        return torch.float64
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RopeParameterError(ValueError):
    """A RoPE scaling that is unknown, lacks a key or has a value out of range."""


class RopeNotStatic(ValueError):
    """A RoPE scaling whose frequencies depend on the sequence length, asked for one table."""


# ---------------------------------------------------------------------------------------------
# RoPE scalings: one frozen dataclass per rope type, each with the numbers it needs.

def _default_inv_freq(theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    """theta^(-2i/rotary_dim), i < rotary_dim/2."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)


@dataclass(frozen=True)
class LinearScaling:
    """Position interpolation: every frequency divided by `factor`."""
    rope_type: ClassVar[str] = "linear"
    factor: float

    def inv_freq(self, theta, rotary_dim, seq_len=None, device=None):
        return _default_inv_freq(theta, rotary_dim, device) / self.factor

    def check(self):
        _positive(self, "factor")


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1: wavelengths longer than original_max_position / low_freq_factor are divided
    by factor, those shorter than original_max_position / high_freq_factor kept, and the ones
    between interpolated smoothly."""
    rope_type: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: float

    def inv_freq(self, theta, rotary_dim, seq_len=None, device=None):
        inv = _default_inv_freq(theta, rotary_dim, device)
        wavelen = 2 * math.pi / inv
        low_wavelen = self.original_max_position / self.low_freq_factor
        high_wavelen = self.original_max_position / self.high_freq_factor
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, inv / self.factor, inv)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, (1 - smooth) * inv / self.factor + smooth * inv, scaled)

    def check(self):
        _positive(self, "factor", "original_max_position")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise RopeParameterError(f"llama3 rope needs 0 < low_freq_factor < high_freq_factor, got "
                                     f"{self.low_freq_factor:g}, {self.high_freq_factor:g}")


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude scale 0.1 m ln(factor) + 1 (1 for factor <= 1), as transformers'
    yarn_get_mscale: the cos/sin factor, and DeepSeek's softmax scale (squared, m = mscale_all_dim)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


@dataclass(frozen=True)
class YarnScaling:
    """YaRN: frequencies that turn fewer than beta_slow times over the pretraining length are
    interpolated (divided by factor), those that turn more than beta_fast times kept, with a
    linear ramp over the dimensions between; cos/sin are scaled by the attention factor
    (0.1 ln(factor) + 1, or the mscale / mscale_all_dim ratio, or given)."""
    rope_type: ClassVar[str] = "yarn"
    factor: float
    original_max_position: float
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def inv_freq(self, theta, rotary_dim, seq_len=None, device=None):
        extrapolated = _default_inv_freq(theta, rotary_dim, device)
        interpolated = extrapolated / self.factor

        def correction_dim(rotations):  # the dimension that turns `rotations` times
            return rotary_dim * math.log(self.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if low == high:
            high += 0.001  # a ramp of zero width would divide by zero
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp   # 1: extrapolate (high frequencies), 0: interpolate
        return interpolated * (1 - keep) + extrapolated * keep

    @property
    def scale(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)

        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def check(self):
        _positive(self, "factor", "original_max_position", "beta_fast", "beta_slow")


@dataclass(frozen=True)
class LongRopeScaling:
    """LongRoPE (Phi-3): one rescale factor per frequency, the short set for sequences up to
    original_max_position and the long set beyond; cos/sin scaled by
    sqrt(1 + ln(factor) / ln(original_max_position)) (or the given attention factor).
    `regime` fixes the set for a constant table ("short" | "long"); None: by sequence length."""
    rope_type: ClassVar[str] = "longrope"
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position: float
    factor: float = 1.0
    attention_factor: float | None = None
    regime: str | None = None

    def inv_freq(self, theta, rotary_dim, seq_len=None, device=None):
        regime = self.regime
        if regime is None:
            if seq_len is None:
                raise RopeNotStatic("longrope frequencies depend on the sequence length: fix the regime "
                                    "('short' up to original_max_position, 'long' beyond) for a constant table")
            regime = "long" if seq_len > self.original_max_position else "short"
        ext = torch.tensor(self.long_factor if regime == "long" else self.short_factor, dtype=torch.float64, device=device)
        if ext.numel() != rotary_dim // 2:
            raise RopeParameterError(f"longrope {regime}_factor has {ext.numel()} entries; rotary dim "
                                     f"{rotary_dim} needs {rotary_dim // 2}")
        return _default_inv_freq(theta, rotary_dim, device) / ext

    @property
    def scale(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position))

    @property
    def static(self) -> bool:
        return self.regime is not None

    def check(self):
        _positive(self, "original_max_position")
        if len(self.short_factor) != len(self.long_factor):
            raise RopeParameterError("longrope short_factor and long_factor differ in length "
                                     f"({len(self.short_factor)} and {len(self.long_factor)})")
        if any(not x > 0 for x in self.short_factor + self.long_factor):
            raise RopeParameterError("longrope factors must be positive")
        if self.regime not in (None, "short", "long"):
            raise RopeParameterError(f"longrope regime must be short or long, got {self.regime!r}")


@dataclass(frozen=True)
class DynamicNTKScaling:
    """Dynamic NTK: past max_position, the base grows to
    theta * (factor * seq_len / max_position - (factor - 1)) ^ (d / (d - 2))."""
    rope_type: ClassVar[str] = "dynamic"
    factor: float
    max_position: float
    static: ClassVar[bool] = False

    def inv_freq(self, theta, rotary_dim, seq_len=None, device=None):
        if seq_len is None:
            raise RopeNotStatic("dynamic NTK rope frequencies depend on the sequence length; a kernel with "
                                "a constant frequency table cannot apply them")
        length = max(seq_len, self.max_position)
        base = theta * (self.factor * length / self.max_position - (self.factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _default_inv_freq(base, rotary_dim, device)

    def check(self):
        _positive(self, "factor", "max_position")


RopeScaling = LinearScaling | Llama3Scaling | YarnScaling | LongRopeScaling | DynamicNTKScaling
SCALINGS: dict[str, type] = {c.rope_type: c for c in
                             (LinearScaling, Llama3Scaling, YarnScaling, LongRopeScaling, DynamicNTKScaling)}
ROPE_TYPES = ("default",) + tuple(SCALINGS)


def _positive(s, *names):
    for n in names:
        v = getattr(s, n)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise RopeParameterError(f"{s.rope_type} rope {n} must be a positive number, got {v!r}")


# ---------------------------------------------------------------------------------------------
# The numbers.

def as_rope_scaling(scaling) -> RopeScaling | None:
    """A scaling object; four numbers are Llama 3's (factor, low_freq_factor,
    high_freq_factor, original_max_position), the form RopeSpec.scaling had first."""
    if scaling is None or isinstance(scaling, tuple(SCALINGS.values())):
        return scaling
    return rope_scaling_from_json(list(scaling))


def rope_inv_freq(theta: float, rotary_dim: int, scaling: RopeScaling | None = None, *,
                  seq_len: int | None = None, device=None) -> torch.Tensor:
    """The [rotary_dim / 2] rotary inverse frequencies in float64. seq_len (the largest
    position + 1) matters to dynamic NTK and to LongRoPE without a fixed regime."""
    scaling = as_rope_scaling(scaling)
    if scaling is None:
        return _default_inv_freq(float(theta), int(rotary_dim), device)
    return scaling.inv_freq(float(theta), int(rotary_dim), seq_len, device)


def static_inv_freq(theta: float, rotary_dim: int, scaling: RopeScaling | None = None) -> tuple[float, ...]:
    """The table a kernel carries (float64 values). Length-dependent types (dynamic NTK,
    LongRoPE without its regime) raise RopeNotStatic."""
    return tuple(rope_inv_freq(theta, rotary_dim, scaling).tolist())


def rope_is_static(scaling: RopeScaling | None) -> bool:
    return getattr(scaling, "static", True)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """What transformers multiplies cos and sin by (1.0 but for yarn and longrope)."""
    return float(getattr(as_rope_scaling(scaling), "scale", 1.0))


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, scaling: RopeScaling | None = None,
                 dtype=None, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [..., rotary_dim / 2] at integer positions, in float64, times the
    attention factor, then cast to dtype. seq_len defaults to the largest position + 1."""
    if seq_len is None:
        seq_len = int(positions.max()) + 1 if positions.numel() else 0
    inv = rope_inv_freq(theta, rotary_dim, scaling, seq_len=seq_len, device=positions.device)
    ang = positions.to(torch.float64)[..., None] * inv
    m = rope_attention_factor(scaling)
    dtype = torch.float64 if dtype is None else dtype
    return (ang.cos() * m).to(dtype), (ang.sin() * m).to(dtype)


# ---------------------------------------------------------------------------------------------
# RoPE scalings from a Hugging Face config, and to/from JSON (manifests).

# keys of a `rope_parameters` dict -> our field names, where they differ
_HF_NAMES = {"original_max_position_embeddings": "original_max_position"}


def rope_scaling_from_hf(params: Mapping[str, Any], max_position_embeddings: int | None = None,
                         longrope_regime: str | None = None) -> RopeScaling | None:
    """The scaling of a transformers `rope_parameters` (or legacy `rope_scaling`) dict; None
    for the default type. Unknown types and missing keys are RopeParameterErrors."""
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in SCALINGS:
        raise RopeParameterError(f"unknown rope type {kind!r} (known: {', '.join(ROPE_TYPES)})")
    given = {_HF_NAMES.get(k, k): v for k, v in params.items()}
    if kind == "dynamic":
        given["max_position"] = max_position_embeddings
    if kind in ("yarn", "longrope") and given.get("factor") is None and max_position_embeddings \
            and given.get("original_max_position"):
        given["factor"] = max_position_embeddings / given["original_max_position"]
    if kind == "longrope":
        given.setdefault("regime", longrope_regime)
        if given.get("original_max_position") is None:
            given["original_max_position"] = max_position_embeddings
    for k in ("beta_fast", "beta_slow"):  # transformers: `or` its default
        if k in given and not given[k]:
            del given[k]
    return make_rope_scaling(kind, given)


def make_rope_scaling(kind: str, values: Mapping[str, Any]) -> RopeScaling | None:
    """A checked scaling of rope type `kind` from named values (extra names are ignored)."""
    if kind == "default":
        return None
    if kind not in SCALINGS:
        raise RopeParameterError(f"unknown rope type {kind!r} (known: {', '.join(ROPE_TYPES)})")
    cls = SCALINGS[kind]
    kw, missing = {}, []
    for f in fields(cls):
        v = values.get(f.name)
        if v is None:
            if f.default is MISSING:
                missing.append(f.name)
            continue
        if isinstance(v, (list, tuple)):
            kw[f.name] = tuple(float(x) for x in v)
        elif isinstance(v, (bool, str)):
            kw[f.name] = v
        else:
            kw[f.name] = float(v)
    if missing:
        raise RopeParameterError(f"{kind} rope needs {', '.join(missing)}")
    s = cls(**kw)
    s.check()
    return s


def rope_scaling_to_json(scaling: RopeScaling | None) -> dict | None:
    scaling = as_rope_scaling(scaling)
    if scaling is None:
        return None
    return {"rope_type": scaling.rope_type, **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in asdict(scaling).items()}}


def rope_scaling_from_json(desc) -> RopeScaling | None:
    """Inverse of rope_scaling_to_json; a 4-list is the llama3 form of older manifests."""
    if not desc:
        return None
    if isinstance(desc, (list, tuple)):
        return make_rope_scaling("llama3", dict(zip(("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position"), desc)))
    return make_rope_scaling(desc["rope_type"], desc)


def rope_scaling_key(scaling: RopeScaling | None) -> str:
    """A short readable tag for plan keys: 'l3_8_1_4_8192', 'yarn_4_32768_...'."""
    scaling = as_rope_scaling(scaling)
    if scaling is None:
        return ""
    tag = {"llama3": "l3"}.get(scaling.rope_type, scaling.rope_type)
    parts = []
    for k, v in asdict(scaling).items():
        if v is None:
            continue
        if isinstance(v, tuple):  # longrope's factor lists: a digest, not 64 numbers
            parts.append(hashlib.sha1(repr(v).encode()).hexdigest()[:8])
        elif isinstance(v, str):
            parts.append(v)
        else:
            parts.append(f"{float(v):g}".replace(".", "p").replace("+", ""))
    return "_".join([tag] + parts)


# ---------------------------------------------------------------------------------------------
# ALiBi and T5.

def alibi_slopes(num_heads: int, max_bias: float = 8.0, device=None, dtype=None) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): 2^(-max_bias * (i + 1) / n) for the n = largest power
    of two <= num_heads; BLOOM's rule for the remaining heads takes every other slope of
    2n heads, the odd ones."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-max_bias / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    extra_base = 2.0 ** (-max_bias / (2 * closest))
    slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float64 if dtype is None else dtype, device=device)


def t5_relative_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128,
                       bidirectional: bool = True) -> torch.Tensor:
    """T5's relative-position bucket of rel = kv_pos - q_pos: exact for distances below half
    the buckets (of one direction), logarithmic up to max_distance, the last bucket beyond.
    Bidirectional gives later keys the upper half of the buckets; causal maps later keys to 0.
    The logarithm is taken in float32, as T5 was trained (f64 moves a few boundaries)."""
    rel = rel.long()
    n = num_buckets
    ret = torch.zeros_like(rel)
    if bidirectional:
        n //= 2
        ret = ret + (rel > 0).long() * n
        dist = rel.abs()
    else:
        dist = -torch.clamp(rel, max=0)
    max_exact = n // 2
    large = max_exact + (torch.log(dist.float() / max_exact) / math.log(max_distance / max_exact)
                         * (n - max_exact)).long()
    large = torch.clamp(large, max=n - 1)
    return ret + torch.where(dist < max_exact, dist, large)


def t5_bucket_table(num_buckets: int, max_distance: int, bidirectional: bool) -> list[int]:
    """Buckets of the distances 0 .. max_distance in one direction (keys before the query);
    every larger distance falls in the last entry's bucket. Kernels index it with
    min(distance, max_distance) and add num_buckets / 2 for later keys when bidirectional."""
    dist = -torch.arange(0, max_distance + 1)
    return t5_relative_bucket(dist, num_buckets, max_distance, bidirectional).tolist()
