"""Loading a transformers checkpoint folder (config.json and safetensors, sharded or not) into a
DecoderModel, without transformers.

    model = lf.from_pretrained("path/to/Llama-3-8B", dtype=torch.bfloat16, device="cuda")
    model.generate([[128000, 9906]], max_new_tokens=32)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..runtime.layers import _dtype_name
from .families import canonical_state_dict, spec_from_config
from .model import DecoderModel
from .spec import ConfigError

__all__ = ["from_pretrained", "checkpoint_files", "load_tensors"]

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


def load_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for name in fh.keys():
                if name in tensors:
                    raise ConfigError(f"{f.name}: tensor '{name}' is in two shards")
                tensors[name] = fh.get_tensor(name)
    return tensors


def from_pretrained(folder: str | os.PathLike, *, dtype: torch.dtype | str = torch.bfloat16,
                    device: torch.device | str | None = None, page_size: int = 16, program=None,
                    kv_dtype: str | None = None, kv_scales: str = "per_tensor") -> DecoderModel:
    """A DecoderModel with the weights of a transformers checkpoint folder (config.json plus
    model.safetensors, or shards with model.safetensors.index.json). The config's model_type
    picks the family (models/families.py); what the family cannot serve is a ConfigError.
    kv_dtype / kv_scales: the paged cache's storage (DecoderModel)."""
    root = Path(folder)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{root}: no config.json")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ConfigError(f"{config_path}: not JSON ({e})") from None
    spec = spec_from_config(config)
    tensors = canonical_state_dict(spec, load_tensors(checkpoint_files(root)))
    device = torch.device(device) if device is not None else torch.device("cpu")
    model = DecoderModel(spec, dtype=_dtype_name(dtype), device=device, page_size=page_size, program=program,
                         kv_dtype=kv_dtype, kv_scales=kv_scales)
    model.load_state_dict(tensors, strict=True)
    return model.eval()
