"""prefetch_l2 (runtime/prefetch.py) refuses what it cannot take before any launch, and the Mamba2 decode step's
switch (LAYERFORGE_MAMBA_PREFETCH) leaves a CPU step as it is (the prefetch is a CUDA launch only)."""
import pytest
import torch

from layerforge.runtime.mamba import Mamba2Mixer, Mamba2MixerConfig, prefetch_default
from layerforge.runtime.prefetch import L2PrefetchError, prefetch_l2


@pytest.mark.parametrize("t", [torch.zeros(4), [1, 2, 3], None])
def test_prefetch_takes_cuda_tensors_only(t):
    with pytest.raises(L2PrefetchError, match="CUDA tensor"):
        prefetch_l2(t)


def test_the_mamba2_step_is_the_same_with_the_switch_on_the_cpu(monkeypatch):
    monkeypatch.delenv("LAYERFORGE_MAMBA_PREFETCH", raising=False)
    assert not prefetch_default()
    cfg = Mamba2MixerConfig(hidden_size=32, intermediate_size=64, num_heads=4, head_dim=16, state_size=8, n_groups=1)
    torch.manual_seed(0)
    mixer = Mamba2Mixer(cfg)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    x = torch.randn(2, 32)
    outs = []
    for value in ("0", "1"):
        monkeypatch.setenv("LAYERFORGE_MAMBA_PREFETCH", value)
        assert prefetch_default() == (value == "1")
        state = mixer.new_state(2)
        outs.append(mixer.step(x, state))
    assert torch.equal(outs[0], outs[1])
    monkeypatch.setenv("LAYERFORGE_MAMBA_PREFETCH", "maybe")
    with pytest.raises(ValueError, match="LAYERFORGE_MAMBA_PREFETCH"):
        prefetch_default()
