"""PagedAttention's choices and checks that need no GPU."""
import pytest

import layerforge as lf
from layerforge.runtime.attention import PagedAttention


@pytest.fixture(scope="module")
def layer():
    return lf.stdlib().specialise("llama_attn", Hq=8, Hkv=2, D=64, dtype="bf16")


@pytest.mark.parametrize("arch,kernel", [("sm_75", "simt"), ("sm_80", "tc"), ("sm_90", "tc"), ("sm_90a", "tc")])
def test_kernel_default_follows_the_architecture(layer, arch, kernel):
    assert PagedAttention(layer, arch=arch).kernel == kernel


def test_explicit_kernel_wins(layer):
    assert PagedAttention(layer, arch="sm_90", kernel="simt").kernel == "simt"


def test_unknown_kernel_is_a_clear_error(layer):
    with pytest.raises(ValueError, match="kernel must be 'tc' or 'simt'"):
        PagedAttention(layer, kernel="wgmma")


def test_ragged_prefill_needs_the_tensor_core_kernels(layer):
    attn = PagedAttention(layer, arch="sm_75")
    with pytest.raises(lf.LayerInputError, match="needs the tensor-core kernels"):
        attn.prefill(None, None, None, None, None, None, max_q_len=1, max_kv_len=1)


def test_tensor_core_plans_for_both_modes(layer, tmp_path):
    from layerforge.runtime.cache import KernelCache
    attn = PagedAttention(layer, arch="sm_90", cache=KernelCache(tmp_path))
    pre, dec = attn.tc_plan("prefill"), attn.tc_plan("decode")
    assert pre.config.wn == 1 and dec.config.wn == 4       # rows split across warps vs keys
    assert pre.key != dec.key and attn.tc_plan("prefill") is pre
