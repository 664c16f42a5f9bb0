"""Loading a transformers checkpoint folder (config.json and safetensors, sharded or not) into a
DecoderModel, without transformers.

    model = lf.from_pretrained("path/to/Llama-3-8B", dtype=torch.bfloat16, device="cuda")
    model.generate([[128000, 9906]], max_new_tokens=32)

A checkpoint with a `quantization_config` of 4-bit AWQ (GEMM layout) or GPTQ (act-order too)
loads its quantised projections as runtime/quant.QuantLinear modules in the kernel's u4 layout
(fused q/k/v and gate/up concatenated along N): decode-sized steps run the weight-only
quantised small-token product, longer ones dequantise. The model is built with float
projections first, then they are replaced (loading needs the float model's memory for a moment).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..runtime.layers import _dtype_name
from .deepseek import DeepseekModel
from .families import canonical_state_dict, spec_from_config
from .mamba import MambaSpec, load_mamba
from .model import DecoderModel
from .spec import ConfigError

__all__ = ["from_pretrained", "checkpoint_files", "load_tensors", "quant_config", "split_quantized",
           "read_rank_state_dict"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards its index names, or the one file."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a checkpoint folder")
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{index}: not a safetensors index (no 'weight_map': {e})") from None
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names {missing[0]}, which is not in {root}")
        return files
    if (root / SINGLE).is_file():
        return [root / SINGLE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if found:
        return [root / n for n in found]
    other = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
    hint = f" (found {', '.join(other)}: save the model with safe_serialization=True)" if other else ""
    raise FileNotFoundError(f"{root}: no {SINGLE} or {INDEX}{hint}")


def _safe_open(path: Path):
    """safetensors' safe_open of one file on the CPU (one place: the tests count the bytes it reads)."""
    from safetensors import safe_open
    return safe_open(str(path), framework="pt", device="cpu")


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with _safe_open(f) as fh:
            for name in fh.keys():
                if name in tensors:
                    raise ConfigError(f"{f.name}: tensor '{name}' is in two shards")
                tensors[name] = fh.get_tensor(name)
    return tensors


# ---- quantised checkpoints (AWQ GEMM, GPTQ: 4-bit weight-only) ---------------------------------
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
_FP8_SCALES = ("weight_scale_inv", "weight_scale")   # transformers' fp8 (multiplied, despite the name), compressed-tensors


def quant_config(config: dict) -> dict | None:
    """What a config's `quantization_config` asks for, as the loader serves it: {"method": "awq"
    | "gptq", "group": G, "zero_offset": 1 (GPTQ's classic format) or 0 (gptq_v2)}, or FP8
    weights with dynamic activations {"method": "fp8", "block": 128 or None}: transformers'
    `fp8` (FineGrainedFP8: e4m3 weights and `weight_scale_inv` per 128 x 128 block) and
    `compressed-tensors` float-quantized (e4m3 weights, `weight_scale` per channel, per tensor or
    per 128 x 128 block); None without one. A method, bit width or layout the kernels do not serve
    is a ConfigError."""
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError("config.json: quantization_config must be an object")
    method = q.get("quant_method")
    if q.get("kv_cache_scheme") is not None:   # compressed-tensors: the checkpoint's own KV-cache scales
        raise ConfigError("config.json: quantization_config.kv_cache_scheme: the checkpoint's KV-cache scales are "
                          "not served (from_pretrained(kv_dtype='fp8_e4m3') scales the cache itself)")
    if method == "fp8":
        return _fp8_config(q)
    if method == "compressed-tensors":
        return _compressed_tensors_config(q)
    if method not in ("awq", "gptq"):
        raise ConfigError(f"config.json: quantization_config.quant_method {method!r} is not served "
                          f"(4-bit 'awq' and 'gptq', 8-bit float 'fp8' and 'compressed-tensors' are)")
    bits = q.get("bits", q.get("w_bit"))   # autoawq's own configs name it w_bit
    if bits is None:
        raise ConfigError("config.json: quantization_config has no 'bits'")
    if bits != 4:
        raise ConfigError(f"config.json: quantization_config.bits {bits!r}: only 4-bit {method} checkpoints are served")
    group = q.get("group_size", q.get("q_group_size"))
    if not isinstance(group, int) or group not in (32, 64, 128):
        raise ConfigError(f"config.json: quantization_config.group_size {group!r}: the kernel serves 32, 64 or 128")
    # version, zero_point and checkpoint_format default as transformers' AwqConfig / GPTQConfig do
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"config.json: quantization_config.version {version!r}: only AWQ's 'gemm' layout is served")
        if not q.get("zero_point", True):
            raise ConfigError("config.json: quantization_config.zero_point false: AWQ without zero points is not served")
        return {"method": "awq", "group": group, "zero_offset": 0}
    fmt = str(q.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"config.json: quantization_config.checkpoint_format {fmt!r} is not served (gptq, gptq_v2)")
    return {"method": "gptq", "group": group, "zero_offset": 0 if fmt == "gptq_v2" else 1}


def _fp8_block(value, where: str) -> int:
    if not isinstance(value, (list, tuple)) or list(value) != [128, 128]:
        raise ConfigError(f"config.json: {where} {value!r}: FP8 weight blocks are served at [128, 128]")
    return 128


def _fp8_config(q: dict) -> dict:
    """transformers' FineGrainedFP8Config (DeepSeek-V3, Qwen3-FP8): e4m3 weights, a
    `weight_scale_inv` per 128 x 128 block, activations quantised as the products run."""
    scheme = q.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"config.json: quantization_config.activation_scheme {scheme!r}: only dynamic "
                          f"activation scales are served")
    return {"method": "fp8", "block": _fp8_block(q.get("weight_block_size", [128, 128]),
                                                 "quantization_config.weight_block_size")}


def _compressed_tensors_config(q: dict) -> dict:
    """compressed-tensors' float-quantized format (FP8-dynamic checkpoints): one config group of
    8-bit float weights, symmetric, scaled per channel, per tensor or per 128 x 128 block, with
    dynamic activations (per token or per group); anything else is a ConfigError naming it."""
    fmt = q.get("format")
    if fmt != "float-quantized":
        raise ConfigError(f"config.json: quantization_config.format {fmt!r}: of compressed-tensors checkpoints "
                          f"'float-quantized' (FP8) is served")
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"config.json: quantization_config.config_groups: one group is served, got {len(groups)}")
    (name, group), = groups.items()
    where = f"quantization_config.config_groups.{name}"
    w = group.get("weights") or {}
    if w.get("type") != "float" or w.get("num_bits") != 8 or not w.get("symmetric", True) or w.get("dynamic"):
        raise ConfigError(f"config.json: {where}.weights {w!r}: static symmetric 8-bit float weights are served")
    strategy = w.get("strategy")
    if strategy not in ("channel", "tensor", "block"):
        raise ConfigError(f"config.json: {where}.weights.strategy {strategy!r}: 'channel', 'tensor' or 'block' "
                          f"scales are served")
    a = group.get("input_activations")
    if a is None or not a.get("dynamic") or a.get("type") != "float" or a.get("num_bits") != 8:
        raise ConfigError(f"config.json: {where}.input_activations {a!r}: the FP8 products quantise activations "
                          f"as they run (dynamic 8-bit float); static or absent activation quantisation is not "
                          f"served")
    block = _fp8_block(w.get("block_structure"), f"{where}.weights.block_structure") if strategy == "block" else None
    return {"method": "fp8", "block": block}


class QuantPart:
    """One quantised Linear of a checkpoint, standing in for its `.weight` while the checkpoint is
    mapped to the model's names: AWQ / GPTQ's qweight, qzeros, scales, g_idx, or FP8's e4m3
    weight and its scale (`weight_scale_inv` or `weight_scale`); `shape` is the logical [N, K];
    parts concatenated along N (fused q/k/v, gate/up) stay a list."""

    def __init__(self, name: str, tensors: dict[str, torch.Tensor], method: str):
        self.name, self.tensors, self.method = name, tensors, method
        if method == "fp8":
            if "weight" not in tensors:
                raise ConfigError(f"checkpoint: {name}.{next(iter(tensors))} without {name}.weight")
            if "input_scale" in tensors:
                raise ConfigError(f"checkpoint: {name}.input_scale: static activation scales are not served")
            w = tensors["weight"]
            if w.dtype != torch.float8_e4m3fn or w.dim() != 2:
                raise ConfigError(f"checkpoint: {name}.weight is {w.dtype} {list(w.shape)}, an FP8 checkpoint's "
                                  f"quantised weights are float8_e4m3fn [N, K]")
            self.shape = w.shape
            return
        missing = [x for x in ("qweight", "qzeros", "scales") if x not in tensors]
        if missing:
            raise ConfigError(f"checkpoint: {name}.{missing[0]} is missing beside {name}.qweight")
        qw = tensors["qweight"]
        n, k = (qw.shape[1] * 8, qw.shape[0]) if method == "awq" else (qw.shape[1], qw.shape[0] * 8)
        self.shape = torch.Size((n, k))

    def to_kernel(self, q: dict, dtype: torch.dtype):
        from ..runtime.quant import awq_to_kernel, gptq_to_kernel, pack_fp8
        t = self.tensors
        try:
            if self.method == "fp8":
                return pack_fp8(t["weight"], t["weight_scale"], q["block"], dtype)
            if self.method == "awq":
                return awq_to_kernel(t["qweight"], t["qzeros"], t["scales"], q["group"], dtype)
            return gptq_to_kernel(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), q["group"], dtype,
                                  q["zero_offset"])
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"checkpoint: {self.name}: {e}") from None


def split_quantized(tensors: dict[str, torch.Tensor], method: str) -> dict[str, object]:
    """The checkpoint's tensors with each quantised Linear's parts (qweight/qzeros/scales/g_idx;
    FP8: the e4m3 weight and its weight_scale_inv or weight_scale) replaced by one QuantPart under
    the name its float weight would have (`<linear>.weight`). An FP8 checkpoint's Linears without
    a scale (its ignored modules: the LM head, ...) stay float weights."""
    out: dict[str, object] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if method == "fp8":
        scaled = {name.rpartition(".")[0] for name in tensors if name.rpartition(".")[2] in _FP8_SCALES}
        for name, t in tensors.items():
            base, _, leaf = name.rpartition(".")
            if base in scaled and leaf in ("weight", "input_scale", *_FP8_SCALES):
                parts.setdefault(base, {})["weight_scale" if leaf in _FP8_SCALES else leaf] = t
            else:
                out[name] = t
    else:
        for name, t in tensors.items():
            base, _, leaf = name.rpartition(".")
            if leaf in _QUANT_SUFFIXES:
                parts.setdefault(base, {})[leaf] = t
            else:
                out[name] = t
        for base, ts in parts.items():
            if "qweight" not in ts:
                raise ConfigError(f"checkpoint: {base}.{next(iter(ts))} without {base}.qweight")
    for base, ts in parts.items():
        out[f"{base}.weight"] = QuantPart(base, ts, method)
    return out


def _fused(name: str, qws: list, dtype: torch.dtype):
    """One QuantWeight of a projection's parts (q/k/v, gate/up: stacked along N; one part as it is)."""
    from ..runtime.quant import QuantWeight
    first = qws[0]
    if len(qws) == 1:
        return first
    if first.wtype == "f8e4m3" and first.group and any(w.n % first.group for w in qws[:-1]):
        raise ConfigError(f"checkpoint: the parts of the fused {name.removesuffix('.weight')} have "
                          f"{[w.n for w in qws]} rows: 128 x 128 block scales stack only in whole blocks")
    return QuantWeight(first.wtype, first.group, torch.cat([w.qweight for w in qws]),
                       None if first.wgroup is None else torch.cat([w.wgroup for w in qws]),
                       None if first.wscale is None else torch.cat([w.wscale for w in qws]),
                       sum(w.n for w in qws), first.k, dtype, first.perm)


def quant_weight(name: str, parts, q: dict, dtype: torch.dtype):
    """The QuantWeight (the kernel's layout) of a canonical weight's quantised parts (a QuantPart, or a list of them
    stacked along N: a fused q/k/v or gate/up)."""
    qws = [p.to_kernel(q, dtype) for p in (parts if isinstance(parts, list) else [parts])]
    perms = [w.perm for w in qws]
    if any(p is not None for p in perms) and not all(p is not None and torch.equal(p, perms[0]) for p in perms):
        # act-order parts of one fused projection share x, so GPTQ orders their columns alike
        raise ConfigError(f"checkpoint: the parts of the fused {name.removesuffix('.weight')} have different "
                          f"act-order column orders (g_idx); they cannot share one product")
    return _fused(name, qws, dtype)


def quant_dtype(dtype) -> torch.dtype:
    """The activation dtype of a model's quantised products: the model's where it is 16-bit, else fp16 (the
    kernels' (scale, zero) pairs are 16-bit)."""
    from ..dsl.types import DType
    t = DType(_dtype_name(dtype)).torch if not isinstance(dtype, torch.dtype) else dtype
    return t if t in (torch.bfloat16, torch.float16) else torch.float16


def _quantised_modules(model: DecoderModel, weights: dict[str, object], q: dict, dtype: torch.dtype) -> None:
    """Replace the model's Linears whose canonical weight is quantised (QuantPart, or a list of
    them for a fused projection, or a QuantWeight already made of them: a tensor-parallel rank's
    part) by QuantLinears in the kernel's layout (u4, f8e4m3), their
    biases too; an MoE layer's quantised experts (a QuantStack) become its expert kernels'
    stacks (runtime/moe.py _Experts.set_quantized)."""
    from ..runtime.quant import QuantLinear, QuantWeight
    from .families import QuantStack
    for name in [n for n, w in weights.items() if isinstance(w, QuantStack)]:   # an MoE layer's experts
        stack = weights.pop(name)
        path, _, proj = name.rpartition(".")
        experts = model.get_submodule(path)
        if not hasattr(experts, "set_quantized"):
            raise ConfigError(f"checkpoint: {name} is a quantised stack, the model's {path} holds no experts")
        try:
            experts.set_quantized(proj, [_fused(f"{path}.{e}.{proj}", [p.to_kernel(q, dtype) for p in parts], dtype)
                                         for e, parts in enumerate(stack)])
        except ValueError as e:
            raise ConfigError(f"checkpoint: {path}: {e}") from None
    for name in [n for n, w in weights.items() if isinstance(w, (QuantPart, list, QuantWeight))]:
        qw = weights.pop(name)
        if not isinstance(qw, QuantWeight):
            qw = quant_weight(name, qw, q, dtype)
        path = name.removesuffix(".weight")
        if not path.startswith("layers."):
            raise ConfigError(f"checkpoint: {path} is quantised: only the decoder layers' projections are served "
                              f"quantised (the LM head and embeddings stay in the model's dtype)")
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (qw.n, qw.k):
            raise ConfigError(f"checkpoint: the quantised {path} is [{qw.n}, {qw.k}], the model's is not a Linear of "
                              f"that shape")
        bias = weights.pop(f"{path}.bias", None)
        bias = None if bias is None else bias.to(dtype)   # QuantLinear keeps its bias in its dtype
        setattr(parent, attr, QuantLinear(qw, bias, cache=None).to(old.weight.device))


def from_pretrained(folder: str | os.PathLike, *, dtype: torch.dtype | str = torch.bfloat16,
                    device: torch.device | str | None = None, page_size: int = 16, program=None,
                    kv_dtype: str | None = None, kv_scales: str = "per_tensor", tp_size: int = 1,
                    pp_size: int = 1) -> DecoderModel:
    """A DecoderModel with the weights of a transformers checkpoint folder (config.json plus
    model.safetensors, or shards with model.safetensors.index.json). The config's model_type
    picks the family (models/families.py); what the family cannot serve is a ConfigError.
    Families with latent attention (DeepSeek-V2/V3) give a DeepseekModel (models/deepseek.py),
    the state-space families (mamba, mamba2) a MambaModel (models/mamba.py).
    kv_dtype / kv_scales: the paged cache's storage (DecoderModel). tp_size / pp_size: this
    process's part of the model split over tp_size x pp_size processes started by torchrun
    (models/parallel.py: tensor and pipeline parallelism; every rank reads only its part of the
    checkpoint: read_rank_state_dict; of a quantised one each reads it whole and keeps its part)."""
    root = Path(folder)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root}: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ConfigError(f"{config_path}: not JSON ({e})") from None
    spec = spec_from_config(config)
    if tp_size * pp_size != 1:   # models/parallel.py: this rank's part of the model
        return _load_parallel(root, spec, config, tp_size, pp_size, dtype=dtype, device=device, page_size=page_size,
                              program=program, kv_dtype=kv_dtype, kv_scales=kv_scales)
    if isinstance(spec, MambaSpec):   # state-space families (mamba, mamba2): models/mamba.py
        return load_mamba(spec, load_tensors(checkpoint_files(root)), config, dtype=dtype, device=device,
                          program=program)
    q = quant_config(config)
    if q is not None and spec.mla is not None:
        raise ConfigError(f"config.json: a quantised {spec.model_type} checkpoint is not served (its latent "
                          "attention's projections are read as float weights)")
    raw = load_tensors(checkpoint_files(root))
    if q is not None:
        raw = split_quantized(raw, q["method"])
    tensors = canonical_state_dict(spec, raw)
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = (DecoderModel if spec.mla is None else DeepseekModel)(
        spec, dtype=_dtype_name(dtype), device=device, page_size=page_size, program=program, kv_dtype=kv_dtype,
        kv_scales=kv_scales)
    if q is None:
        model.load_state_dict(tensors, strict=True)
        return model.eval()
    # the quantised projections become QuantLinears (activations in the model's dtype where it is
    # 16-bit, else fp16 pairs); the rest loads as usual
    _quantised_modules(model, tensors, q, quant_dtype(model.dtype))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = quant_loaded(model, missing)
    if missing or unexpected:
        raise ConfigError(f"checkpoint: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    return model.eval()


def quant_loaded(model, missing: list[str]) -> list[str]:
    """load_state_dict's missing names less those of the quantised modules' buffers (already set)."""
    quant_buffers = {n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"}
    quant_experts = {f"{n}.{p}_{b}" for n, m in model.named_modules() if hasattr(m, "set_quantized")
                     for p in m._shapes for b in "qs"}
    return [k for k in missing if k.rpartition(".")[0] not in quant_buffers and k not in quant_experts]


def _load_parallel(root: Path, spec, config: dict, tp_size: int, pp_size: int, *, dtype, device, **kw) -> DecoderModel:
    """from_pretrained's tp_size / pp_size: the sizes checked before anything is read, then the
    process grid (runtime/parallel.init_parallel) and this rank's model of the full checkpoint."""
    from ..runtime.parallel import init_parallel
    from .parallel import check_parallel, parallel_model, stage_layers
    check_parallel(spec, tp_size, pp_size)
    q = quant_config(config)
    layout = init_parallel(tp_size, pp_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())   # init_parallel made LOCAL_RANK's current
    if q is not None:
        # a quantised checkpoint: each rank reads it whole, makes the kernel's layout of each projection, and keeps
        # its part of that (models/parallel.shard_state_dict: rows or whole groups of columns)
        tensors = canonical_state_dict(spec, split_quantized(load_tensors(checkpoint_files(root)), q["method"]))
        return parallel_model(spec, tensors, layout, dtype=dtype, device=device, quant=q, **kw)
    layers = stage_layers(spec.num_layers, layout.pp.size, layout.stage)
    tensors = read_rank_state_dict(checkpoint_files(root), spec, tp_rank=layout.tp.rank, tp_size=layout.tp.size,
                                   layers=layers, first=layout.stage == 0, last=layout.stage == layout.pp.size - 1)
    return parallel_model(spec, tensors, layout, dtype=dtype, device=device, sharded=True, **kw)


# ---- a rank's part of a checkpoint, read in slices -----------------------------------------------
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_rank_state_dict(files: list[Path], spec, *, tp_rank: int = 0, tp_size: int = 1, layers: range | None = None,
                         first: bool = True, last: bool = True) -> dict[str, torch.Tensor]:
    """Tensor-parallel rank tp_rank's canonical tensors of the stage with `layers` (first / last:
    whether it has the embeddings / the final norm and head; the layers keep the full model's
    numbers), read from the safetensors files as slices, so a rank's host memory holds about its
    shard: exactly what models/parallel.shard_state_dict then stage_state_dict make of the
    whole checkpoint.

    The names come from models/families.py alone: canonical_state_dict checks the files' names
    and shapes (on meta tensors, reading nothing), hf_names gives each canonical tensor's recipe,
    models/parallel.shard_plan its rank's pieces in canonical coordinates, which map to rows or
    columns of the file tensors: copied and transposed (Conv1D) tensors, concatenations (q/k/v,
    gate/up), the experts' stacks (one tensor an expert, or transformers 5's stacked ones) and the
    shared expert's slices. Read whole, then split: GPT-NeoX's and BLOOM's head-interleaved q/k/v
    and Falcon's grouped q/k/v (reordered by a whole read), the replicated tensors (norms, router,
    shared-expert gate), and the row-split biases on rank 0 (the other ranks' zeros read nothing)."""
    from .families import branch_scaled, canonical_state_dict, checkpoint_key, hf_names
    from .parallel import apply_shard_plan, shard_plan, stage_state_dict
    from contextlib import ExitStack
    layers = range(spec.num_layers) if layers is None else layers
    with ExitStack() as stack:
        where: dict[str, object] = {}    # the file's tensor name -> its open file
        meta: dict[str, torch.Tensor] = {}
        for f in files:
            fh = stack.enter_context(_safe_open(f))
            for name in fh.keys():
                if name in where:
                    raise ConfigError(f"{f.name}: tensor '{name}' is in two shards")
                sl = fh.get_slice(name)
                where[name] = fh
                meta[name] = torch.empty(sl.get_shape(), dtype=_ST_DTYPES.get(sl.get_dtype(), torch.float32),
                                         device="meta")
        shapes = {n: tuple(t.shape) for n, t in canonical_state_dict(spec, meta).items()}   # names and shapes checked
        fused = any(n.endswith((".experts.gate_up_proj", ".experts.down_proj")) for n in meta)
        recipes = hf_names(spec, fused_experts=fused)
        # a recipe's name -> the file's name: canonical_state_dict's matching (the prefix, old aliases)
        wanted = {n for _, names in recipes.values() for n in names}
        file_of = {}
        for name in meta:
            key = checkpoint_key(spec, name, wanted)[1]
            if key in wanted:
                file_of[key] = name
        keep = stage_state_dict({n: n for n in shapes}, layers, first=first, last=last,
                                tied=spec.tie_word_embeddings).values()

        def piece(name: str, dim: int, a: int, b: int) -> torch.Tensor:
            f = file_of[name]
            return where[f].get_slice(f)[(slice(None),) * dim + (slice(a, b),)]

        out: dict[str, torch.Tensor] = {}
        whole: list[str] = []
        for canon in keep:
            plan = shard_plan(spec, canon, shapes[canon], tp_rank, tp_size)
            op, names = recipes[canon]
            if plan == "rank0" and tp_rank:
                out[canon] = torch.zeros(shapes[canon], dtype=meta[file_of[names[0]]].dtype)
            elif plan is None or plan == "rank0" or (t := _read_plan(op, names, plan, shapes[canon], spec, piece,
                                                                     lambda n: meta[file_of[n]].shape)) is None:
                whole.append(canon)
            else:
                out[canon] = branch_scaled(spec, canon, t)
        if whole:   # the recipes' own reordering on whole reads (the rest stays on the meta device)
            needed = {file_of[n] for c in whole for n in recipes[c][1]}
            real = {n: (where[n].get_tensor(n) if n in needed else t) for n, t in meta.items()}
            made = canonical_state_dict(spec, real)
            for canon in whole:
                plan = shard_plan(spec, canon, shapes[canon], tp_rank, tp_size)
                out[canon] = apply_shard_plan(made[canon], plan)
    return {n: out[n] for n in keep}


def _read_plan(op: str, names: tuple[str, ...], plan, shape: tuple[int, ...], spec, piece, file_shape):
    """The canonical tensor of recipe (op, names), rank's pieces only (plan: (dim, ranges) in the
    canonical tensor's coordinates), each read by piece(file name, dim, start, stop); None where the
    recipe reorders rows so that a whole read is needed (heads3, groups)."""
    dim, ranges = plan

    def cat(ts, d):
        return ts[0] if len(ts) == 1 else torch.cat(ts, d)

    def along_parts(parts: list[tuple[str, int, int]], d: int, rs) -> list[torch.Tensor]:
        """Reads of the ranges rs of a concatenation of parts (file name, its first row, rows) along
        the file tensors' dim d (the parts concatenated along it)."""
        got, offset = [], 0
        segs = []
        for name, start, n in parts:
            segs.append((name, start, offset, offset + n))
            offset += n
        for r in rs:
            for name, start, lo, hi in segs:
                a, b = max(r.start, lo), min(r.stop, hi)
                if a < b:
                    got.append(piece(name, d, start + a - lo, start + b - lo))
        return got

    if op == "copy":
        return cat([piece(names[0], dim, r.start, r.stop) for r in ranges], dim).contiguous()
    if op == "T":   # canonical [a, b] is the file's [b, a]
        return cat([piece(names[0], 1 - dim, r.start, r.stop) for r in ranges], 1 - dim).t().contiguous()
    if op == "cat":   # the names' rows concatenated
        if dim == 0:
            return cat(along_parts([(n, 0, file_shape(n)[0]) for n in names], 0, ranges), 0).contiguous()
        return cat([cat([piece(n, dim, r.start, r.stop) for n in names], 0) for r in ranges], dim).contiguous()
    if op in ("stack", "stack_pairs") and dim >= 1:   # one file tensor an expert (gate and up a pair)
        group = 1 if op == "stack" else 2
        experts = [names[j:j + group] for j in range(0, len(names), group)]
        d = dim - 1
        out = []
        for ns in experts:
            if d == 0:
                out.append(cat(along_parts([(n, 0, file_shape(n)[0]) for n in ns], 0, ranges), 0))
            else:
                out.append(cat([cat([piece(n, d, r.start, r.stop) for n in ns], 0) for r in ranges], d))
        return torch.stack(out)
    if op in ("shared_gate_up", "shared_down"):   # the shared expert in slices of the experts' size F
        Fe = spec.moe.inter
        S = shape[0]
        out = []
        for j in range(S):
            if op == "shared_gate_up" and dim == 1:   # slice j: gate rows j F.., then up rows j F..
                out.append(cat(along_parts([(names[0], j * Fe, Fe), (names[1], j * Fe, Fe)], 0, ranges), 0))
            elif op == "shared_down" and dim == 2:    # slice j: down columns j F..
                out.append(cat([piece(names[0], 1, j * Fe + r.start, j * Fe + r.stop) for r in ranges], 1))
            else:
                return None
        return torch.stack(out)
    return None
