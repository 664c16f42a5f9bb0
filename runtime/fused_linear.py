"""Projections fused into one Linear (q/k/v, gate/up) that load and save as transformers'
separate ones, so Hugging Face state dicts go in and come out unchanged.

    fuse_parts(state_dict, prefix, "qkv_proj", ["q_proj", "k_proj", "v_proj"])    # on load
    split_parts(state_dict, prefix, "qkv_proj", ["q_proj", "k_proj", "v_proj"], sizes)  # on save
"""
from __future__ import annotations

from typing import Sequence

import torch


def fuse_parts(state_dict: dict, prefix: str, fused: str, parts: Sequence[str]) -> None:
    """Replace the parts' weight (and bias) by their concatenation along the output rows."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{p}.{kind}" for p in parts]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])


def split_parts(state_dict: dict, prefix: str, fused: str, parts: Sequence[str], sizes: Sequence[int]) -> dict:
    """The inverse: the fused weight (and bias) split into the parts' rows."""
    for kind in ("weight", "bias"):
        key = f"{prefix}{fused}.{kind}"
        if key in state_dict:
            for p, t in zip(parts, state_dict.pop(key).split(list(sizes))):
                state_dict[f"{prefix}{p}.{kind}"] = t
    return state_dict
