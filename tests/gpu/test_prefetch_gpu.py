"""The L2 prefetch on the GPU (runtime/prefetch.py): it launches for tensors of every size (empty, under 16 bytes,
tails that are not whole 16-byte pieces, past one thread's run, a few hundred MB), in eager calls and in a CUDA
graph, and leaves every byte as it was; a tensor it cannot take is refused before any launch; the Mamba2 decode
step with LAYERFORGE_MAMBA_PREFETCH=1 gives the same outputs and states as without (bitwise), eager and graphed."""
import pytest
import torch

from layerforge.runtime.prefetch import L2PrefetchError, prefetch_l2

from ..models.test_mamba import hf_mixer, ours_mixer
from ..seeding import seeded_generator


@pytest.mark.parametrize("nbytes", [0, 1, 15, 16, 17, 4096 + 8, 32 * 32768 + 48, 26_214_400, 300 * 2 ** 20 + 3])
def test_prefetch_any_size_leaves_the_bytes(nbytes):
    gen = seeded_generator("l2_prefetch", nbytes)
    t = torch.randint(0, 256, (nbytes,), generator=gen, dtype=torch.uint8).cuda()
    before = t.clone()
    assert prefetch_l2(t) == nbytes
    torch.cuda.synchronize()
    assert torch.equal(t, before)


def test_prefetch_in_a_graph_and_of_a_weight():
    w = torch.randn(2560, 5120, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 5120, device="cuda", dtype=torch.bfloat16)
    want = x @ w.T
    out = torch.empty_like(want)
    prefetch_l2(w)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        prefetch_l2(w)
        torch.matmul(x, w.T, out=out)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_prefetch_refuses_before_any_launch():
    t = torch.zeros(64, dtype=torch.uint8, device="cuda")
    with pytest.raises(L2PrefetchError, match="16-byte aligned"):
        prefetch_l2(t[1:])
    with pytest.raises(L2PrefetchError, match="contiguous"):
        prefetch_l2(torch.zeros(8, 8, device="cuda").T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_mamba2_step_with_the_prefetch_equals_without(monkeypatch, dtype):
    gen = seeded_generator("mamba2_prefetch_gpu", dtype)
    cfg, hf = hf_mixer("mamba2", gen)
    mixer = ours_mixer(cfg, hf.to(dtype), dtype=dtype, device="cuda")
    xs = [torch.randn(3, cfg.hidden_size, generator=gen).to("cuda", dtype) for _ in range(4)]
    runs = []
    for value in ("0", "1"):
        monkeypatch.setenv("LAYERFORGE_MAMBA_PREFETCH", value)
        state = mixer.new_state(3)
        ys = [mixer.step(x, state) for x in xs]
        static = xs[0].clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = mixer.step(static, state)
        for x in xs:
            static.copy_(x)
            g.replay()
            ys.append(yg.clone())
        runs.append((ys, state.ssm.clone(), state.conv.clone()))
    (ys0, ssm0, conv0), (ys1, ssm1, conv1) = runs
    assert all(torch.equal(a, b) for a, b in zip(ys0, ys1)) and not any(torch.isnan(y).any() for y in ys1)
    assert torch.equal(ssm0, ssm1) and torch.equal(conv0, conv1)
