"""What the Llama layer tests share on transformers' side: the mask its eager attention
takes, and the one error measure they assert."""
import torch


def causal_mask(xs):
    """The additive 4-D causal mask eager attention takes, for xs [1, L, H] (built here: the
    mask helpers' signatures differ between transformers releases)."""
    L = xs.shape[1]
    return torch.full((L, L), float("-inf"), device=xs.device, dtype=xs.dtype).triu(1)[None, None]


def check(got, want, what, tol):
    assert not torch.isnan(got).any(), f"{what}: NaN"
    err = (got.double() - want.double()).norm() / want.double().norm()
    assert err < tol, f"{what}: relative error {err:.3g}"
