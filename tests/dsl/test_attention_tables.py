"""What a hook's read of an extra table means when its index is out of range: the index is
clamped into the dim, for every score element, masked ones included (the kernels clamp, and
cannot raise). The reference evaluator follows that meaning."""
from __future__ import annotations

import torch

import layerforge as lf

BLOCKS = """
dims Hq, Hkv, D, NR
dynamic B, S, Skv
attention implicit(q: f32[B, S, Hq, D], k: f32[B, Skv, Hkv, D], v: f32[B, Skv, Hkv, D],
                   bias: f32[NR, Hq]) -> f32[B, S, Hq, D] {
    score = score + bias[q_pos - kv_pos, h]
    mask = q_pos >= kv_pos
}
attention explicit(q: f32[B, S, Hq, D], k: f32[B, Skv, Hkv, D], v: f32[B, Skv, Hkv, D],
                   bias: f32[NR, Hq]) -> f32[B, S, Hq, D] {
    score = score + bias[min(max(q_pos - kv_pos, 0), NR - 1), h]
    mask = q_pos >= kv_pos
}
"""


def run(name: str, inputs: dict, **kw) -> torch.Tensor:
    layer = lf.loads(BLOCKS).specialise(name, Hq=2, Hkv=2, D=8, NR=3)
    (out,) = lf.evaluate(layer.function, inputs, precision="float64", **kw)
    return out


def test_out_of_range_table_index_reads_the_clamped_element():
    g = torch.Generator().manual_seed(0)
    inputs = {"q": torch.randn(1, 6, 2, 8, generator=g), "k": torch.randn(1, 6, 2, 8, generator=g),
              "v": torch.randn(1, 6, 2, 8, generator=g), "bias": torch.randn(3, 2, generator=g) * 4}
    # q_pos - kv_pos runs from -5 (masked) to 5 (past NR = 3): both ends read clamped rows
    out = run("implicit", inputs)
    assert torch.equal(out, run("explicit", inputs))
    assert not torch.isnan(out).any()


def test_masked_elements_index_out_of_range_without_error():
    """Queries placed before every key: each element is masked and indexes below 0."""
    g = torch.Generator().manual_seed(1)
    inputs = {"q": torch.randn(1, 2, 2, 8, generator=g), "k": torch.randn(1, 4, 2, 8, generator=g),
              "v": torch.randn(1, 4, 2, 8, generator=g), "bias": torch.randn(3, 2, generator=g)}
    out = run("implicit", inputs, q_positions=torch.tensor([[-9, -8]]), kv_positions=torch.arange(4)[None])
    assert torch.equal(out, torch.zeros_like(out))   # fully masked rows are zeros
