"""Shared pieces of the tests that hold the reference evaluator against independent code.

A `Mode` is one way of running a definition: precision="program" with f32 or bf16 storage,
or precision="float64" (f32 inputs, every float held in float64). `assert_matches` checks
dtype, finiteness and closeness with the tolerance that fits the mode.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import layerforge as lf


@dataclass(frozen=True)
class Mode:
    name: str
    dsl_dtype: str        # bound to the dtype parameter T
    precision: str        # evaluate(..., precision=)
    storage: torch.dtype  # dtype of the tensors handed to the evaluator
    ref: torch.dtype      # dtype the independent torch code computes in
    out: torch.dtype      # dtype the evaluator returns for T outputs
    rtol: float
    atol: float

    def __str__(self) -> str:
        return self.name

    def inp(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.storage)

    def to_ref(self, t: torch.Tensor) -> torch.Tensor:
        """The evaluator's input as the torch reference should see it (same values)."""
        return t.to(self.ref)

    @property
    def f32_out(self) -> torch.dtype:
        """What the evaluator returns for outputs declared f32."""
        return torch.float64 if self.precision == "float64" else torch.float32


F32 = Mode("f32", "f32", "program", torch.float32, torch.float32, torch.float32, 1e-5, 1e-5)
# bf16 has 8 significant bits: one rounding is <= 2^-8 relative; two differently ordered
# roundings can differ by one ulp (<= 2^-7), so 1.6e-2 allows two ulps.
BF16 = Mode("bf16", "bf16", "program", torch.bfloat16, torch.bfloat16, torch.bfloat16, 1.6e-2, 1e-2)
F64 = Mode("f64", "f32", "float64", torch.float32, torch.float64, torch.float64, 1e-10, 1e-10)
MODES = [F32, BF16, F64]


@functools.lru_cache(maxsize=None)
def stdlib() -> lf.Program:
    return lf.stdlib()


def specialise(name: str, mode: Mode, **bindings):
    return stdlib().specialise(name, dtype=mode.dsl_dtype, **bindings).function


def run(name: str, mode: Mode, inputs: dict, *, q_positions=None, kv_positions=None, **bindings):
    fn = specialise(name, mode, **bindings)
    return lf.evaluate(fn, inputs, precision=mode.precision, q_positions=q_positions, kv_positions=kv_positions)


def assert_finite(t: torch.Tensor) -> None:
    assert not torch.isnan(t).any(), "output has NaN"
    assert torch.isfinite(t).all(), "output has inf"


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, mode: Mode, *, dtype: torch.dtype | None = None,
                   rtol: float | None = None, atol: float | None = None) -> None:
    """actual (from the evaluator) has the mode's output dtype, is finite and is close to expected."""
    assert actual.dtype == (mode.out if dtype is None else dtype)
    assert actual.shape == expected.shape
    assert_finite(actual)
    torch.testing.assert_close(actual.double(), expected.double(),
                               rtol=mode.rtol if rtol is None else rtol, atol=mode.atol if atol is None else atol)


def distinct_rows(n: int, e: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Random [n, e] logits with no ties inside a row after rounding to dtype (top-k is then unique)."""
    rows = []
    while len(rows) < n:
        pool = (torch.randn(8 * e) * scale).to(dtype).unique()  # distinct representable values
        if pool.numel() >= e:
            rows.append(pool[torch.randperm(pool.numel())[:e]])
    return torch.stack(rows)
