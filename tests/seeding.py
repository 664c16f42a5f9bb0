"""Reproducible random test inputs.

A case's inputs are drawn from a generator seeded by what names the case (the layer, its
sizes, its dtype...), so different cases draw different inputs and a failing case draws the
same ones again in the next run. The seed is a CRC of the parts' repr, never `hash()`, which
Python randomises per process for strings."""
from __future__ import annotations

import zlib

import torch


def stable_seed(*parts) -> int:
    """A seed that depends only on `parts` (ints, strings, dtypes, tuples of them)."""
    return zlib.crc32(repr(parts).encode())


def seeded_generator(*parts) -> torch.Generator:
    """A CPU generator for the case named by `parts` (draw on the CPU, then move)."""
    return torch.Generator().manual_seed(stable_seed(*parts))
