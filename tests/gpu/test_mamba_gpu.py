"""Mamba and Mamba2 on the GPU (runtime/mamba.py over the scan kernels, models/mamba.py): the
mixers in float32 and bf16 against transformers' torch paths on CUDA, prefill (lengths that
are not chunk multiples) then 16 decode steps, the conv and SSM states against transformers'
cache at every step, cache rows outside the step's slots poisoned (NaN) and left untouched;
tiny random models' logits and greedy generation against transformers; the CUDA-graph decode
step (DecodeGraph) against eager steps."""
from __future__ import annotations

import copy

import pytest
import torch

import layerforge as lf
from layerforge.models.mamba import DecodeGraph
from layerforge.runtime.mamba import MambaStateCache

from ..models.test_mamba import MIXERS, hf_config, hf_group_norms_, hf_mixer, hf_run, ours_mixer, randomise_
from ..seeding import seeded_generator

transformers = pytest.importorskip("transformers")
from transformers.cache_utils import DynamicCache  # noqa: E402

# the largest-magnitude-relative tolerance of each dtype (the scans' sums cancel)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(ours).any() and not torch.isinf(ours).any()
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0,
                               atol=TOL[dtype] * max(ref.float().abs().max().item(), 1.0))


def check_against(ours: torch.Tensor, ref: torch.Tensor, low: torch.Tensor | None, dtype: torch.dtype) -> None:
    """ours within TOL[dtype] of the float32 reference's largest magnitude, or (bf16) no further
    from it than twice transformers' own bf16 result `low` is."""
    assert not torch.isnan(ours).any() and not torch.isinf(ours).any()
    bound = TOL[dtype] * max(ref.float().abs().max().item(), 1.0)
    if low is not None:
        bound = max(bound, 2 * (low.float() - ref.float()).abs().max().item())
    torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=bound)


def poisoned_cache(mixer, slots: list[int], max_seqs: int = 4) -> MambaStateCache:
    """A one-layer state cache whose every row is NaN but those of `slots` (allocated: zeros)."""
    cache = MambaStateCache(num_layers=1, max_seqs=max_seqs, conv_shape=mixer.conv_shape, ssm_shape=mixer.ssm_shape,
                            dtype=mixer.in_proj.weight.dtype, device="cuda")
    cache.conv.fill_(float("nan"))
    cache.ssm.fill_(float("nan"))
    for s in slots:
        cache.allocate(s)
    return cache


class Reference:
    """transformers' mixer in float32 on CUDA (weights rounded to `dtype` first) with its cache,
    and for bf16 its own bf16 run beside it: ours must be within TOL of the float32 outputs and
    states, or no further from them than twice transformers' bf16 path is."""

    def __init__(self, cfg, hf, dtype):
        self.cfg, self.dtype = cfg, dtype
        rounded = {k: v.to(dtype) for k, v in hf.state_dict().items()}
        self.f32 = hf_group_norms_(type(hf)(cfg, layer_idx=0).eval().cuda())
        self.f32.load_state_dict({k: v.float() for k, v in rounded.items()})
        self.low = None
        if dtype != torch.float32:
            self.low = hf_group_norms_(type(hf)(cfg, layer_idx=0).eval().to("cuda", dtype))
            self.low.load_state_dict(rounded)
        self.caches = [DynamicCache(config=cfg) for _ in range(2)]

    @torch.no_grad()
    def __call__(self, x):
        ref = hf_run(self.f32, x.float(), self.caches[0])
        low = None if self.low is None else hf_run(self.low, x, self.caches[1])
        return ref, low

    def states(self, which: int):
        layer = self.caches[which].layers[0]
        return layer.conv_states[0], layer.recurrent_states[0]

    def check(self, ours, ref, low) -> None:
        check_against(ours, ref, low, self.dtype)

    def check_states(self, state) -> None:
        conv, ssm = self.states(0)
        conv_low, ssm_low = self.states(1) if self.low is not None else (None, None)
        self.check(state.conv, conv, conv_low)
        self.check(state.ssm, ssm, ssm_low)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("length", [13, 300])
@pytest.mark.parametrize("name", MIXERS)
def test_mixer_prefill_then_16_decode_steps_match_transformers_on_cuda(name, length, dtype):
    gen = seeded_generator("mamba_mixer_gpu", name, length, dtype)
    cfg, hf = hf_mixer(name, gen)
    ref = Reference(cfg, hf, dtype)
    mixer = ours_mixer(cfg, hf.to(dtype), dtype=dtype, device="cuda")
    B, H = 2, cfg.hidden_size
    slots = [1, 2]                       # consecutive: the kernels work on the cache's rows in place
    cache = poisoned_cache(mixer, slots)
    state = cache.states(0, slots)
    x = torch.randn(B, length, H, generator=gen).to("cuda", dtype)
    ref.check(mixer(x, state), *ref(x))
    ref.check_states(state)
    for i in range(16):
        xi = torch.randn(B, 1, H, generator=gen).to("cuda", dtype)
        ref.check(mixer.step(xi, state), *ref(xi))
        ref.check_states(state)
    torch.cuda.synchronize()
    assert torch.isnan(cache.conv[0, [0, 3]]).all() and torch.isnan(cache.ssm[0, [0, 3]]).all()


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_gathered_slots_step_like_consecutive_ones(name):
    """Slots 3 and 0 (gathered and written back) run as slots 0 and 1 of a fresh state do."""
    gen = seeded_generator("mamba_gather_gpu", name)
    cfg, hf = hf_mixer(name, gen)
    mixer = ours_mixer(cfg, hf.cuda(), device="cuda")
    cache = poisoned_cache(mixer, [3, 0])
    own = mixer.new_state(2)
    x = torch.randn(2, 7, cfg.hidden_size, generator=gen).cuda()
    g = cache.states(0, [3, 0])
    y = mixer(x, g)
    cache.commit(0, [3, 0], g)
    close(y, mixer(x, own), torch.float32)
    for _ in range(4):
        xi = torch.randn(2, cfg.hidden_size, generator=gen).cuda()
        g = cache.states(0, [3, 0])
        y = mixer.step(xi, g)
        cache.commit(0, [3, 0], g)
        close(y, mixer.step(xi, own), torch.float32)
    close(cache.ssm[0, [3, 0]], own.ssm, torch.float32)
    assert torch.isnan(cache.ssm[0, [1, 2]]).all()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """(name, dtype) -> (transformers model on CUDA, ours from its save_pretrained folder)."""
    out = {}
    for name in MIXERS:
        cfg = hf_config(name)
        cls = transformers.MambaForCausalLM if cfg.model_type == "mamba" else transformers.Mamba2ForCausalLM
        hf = cls(cfg).eval()
        randomise_(hf, seeded_generator("mamba_model_gpu", name))
        if cfg.tie_word_embeddings:
            hf.tie_weights()
        folder = tmp_path_factory.mktemp(name)
        hf.save_pretrained(folder)
        for dtype in (torch.float32, torch.bfloat16):
            out[name, dtype] = (hf_group_norms_(cls.from_pretrained(folder, dtype=dtype).to("cuda").eval()),
                                lf.from_pretrained(folder, dtype=dtype, device="cuda"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", MIXERS)
def test_model_logits_match_transformers_on_cuda(tiny_models, name, dtype):
    hf, ours = tiny_models[name, dtype]
    ids = torch.randint(0, hf.config.vocab_size, (3, 70), generator=seeded_generator("mamba_logits_gpu", name)).cuda()
    with torch.no_grad():
        if dtype == torch.float32:
            ref, low = hf(ids).logits, None
        else:   # transformers in float32 on the same (bf16) weights, and its own bf16 run
            ref, low = copy.deepcopy(hf).float()(ids).logits, hf(ids).logits
    check_against(ours(ids), ref, low, dtype)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("name", MIXERS)
def test_greedy_generation_equals_transformers_on_cuda(tiny_models, name, graphs):
    """float32 (bf16's argmax may flip on a near tie between two implementations' roundings)."""
    hf, ours = tiny_models[name, torch.float32]
    gen = seeded_generator("mamba_generate_gpu", name)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=gen).tolist() for n in (20, 5, 5)]
    got = ours.generate(prompts, max_new_tokens=24, cuda_graphs=graphs)
    for p, g in zip(prompts, got):
        ref = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        assert g == ref[0, len(p):].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_graph_decode_equals_eager_steps(tiny_models, name, dtype):
    """DecodeGraph replays give the logits and states of eager steps (same kernels: equal)."""
    _, ours = tiny_models[name, dtype]
    V = ours.spec.vocab_size
    gen = seeded_generator("mamba_graph_gpu", name, dtype)
    prompt = torch.randint(0, V, (3 * 6,), generator=gen).int().cuda()
    caches = []
    for _ in range(2):
        c = ours.make_cache(max_seqs=3)
        for s in range(3):
            c.allocate(s)
        ours.step(prompt, [s for s in range(3) for _ in range(6)], c)
        caches.append(c)
    graph = DecodeGraph(ours, caches[0], 3)
    for _ in range(5):
        tok = torch.randint(0, V, (3,), generator=gen).cuda()
        a = graph.decode(tok).clone()
        b = ours.step(tok.int(), [0, 1, 2], caches[1])
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(caches[0].ssm, caches[1].ssm, rtol=0, atol=0)
    torch.testing.assert_close(caches[0].conv, caches[1].conv, rtol=0, atol=0)
    assert graph.replays == 5 and list(caches[0].lengths) == [11, 11, 11]
