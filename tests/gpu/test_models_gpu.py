"""Whole models on the GPU: every family's tiny random transformers model, loaded with
lf.from_pretrained in bf16, gives transformers' logits (f32 reference, bf16 tolerance; MoE models
where their routing agrees with transformers'), and in f32 its logits and 16 greedy tokens equal
transformers'; a decode step replayed from a CUDA graph equals the eager step; a batch decodes
like its members alone. DeepSeek (latent attention: bf16/f16 only on the GPU, no graphs): prefill
and decode-kernel steps give transformers' logits where the routing agrees."""
from __future__ import annotations

import pytest
import torch

from layerforge.models.engine import Engine, generate
from layerforge.runtime import moe
from layerforge.runtime.mla_decode import MLADecode

from ..models.hf_tiny import MLA_FAMILIES, MOE_FAMILIES, engine_logits, routed_logits, tiny_configs, tiny_loader

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU on this machine", allow_module_level=True)

FAMILIES = sorted(tiny_configs())
DENSE = [name for name in FAMILIES if name not in MOE_FAMILIES + MLA_FAMILIES]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_loader(tmp_path_factory, head_dim=64, dtype=torch.bfloat16, device="cuda")


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float = 3e-2) -> None:
    assert not got.isnan().any()
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("name", DENSE)
def test_logits_match_transformers(loaded, name):
    hf, ours = loaded(name)
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
    _close(ours(ids), ref)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_logits_match_transformers_where_the_routing_agrees(loaded, name):
    """A prefill of 148 tokens (the experts on the grouped products) in bf16: where every MoE layer
    chose transformers' experts for a position and those before it (rounding tips a few near ties
    of the top k), the logits are transformers'."""
    hf, ours = loaded(name)
    ids = torch.randint(0, 96, (4, 37), generator=torch.Generator().manual_seed(1)).cuda()
    got, ref, agree = routed_logits(hf, ours, ids)
    assert agree.sum() >= ids.numel() // 4, agree.sum(-1)
    agree = agree.to(got.device)
    _close(got[agree], ref[agree])


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_moe_decode_runs_the_expert_kernels_and_graphs_equal_eager(loaded, name, monkeypatch):
    """bf16 MoE decode steps (at most EXPERT_KERNEL_ROWS tokens) run the experts on the small-token
    kernels (runtime/moe.expert_product) outside the fused dense layer (fuses() is False); they are
    captured in CUDA graphs, whose greedy tokens equal eager steps'."""
    _, ours = loaded(name)
    x = torch.zeros(4, ours.spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    # past the expert kernels' rows a step is capturable where torch's grouped GEMM serves it (sm_90 bf16)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert not ours.fuses(x) and ours.capturable(4) and ours.capturable(moe.EXPERT_KERNEL_ROWS + 1) == hopper
    rows = []
    product = moe.expert_product
    monkeypatch.setattr(moe, "expert_product", lambda *a, **k: rows.append(k["rows"]) or product(*a, **k))
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 17, 2, 9)]
    a = generate(ours, prompts, max_new_tokens=10)                       # decode steps from CUDA graphs
    assert ours._engine.graphs is not None and ours._engine.graphs._graphs
    b = generate(ours, prompts, max_new_tokens=10, cuda_graphs=False)    # eager steps
    assert a == b and all(len(x) == 10 for x in a)
    assert rows and max(rows) <= moe.EXPERT_KERNEL_ROWS
    ours.release_engine()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3_text", "qwen3", "gpt2", "bloom", "falcon", "phi3"])
def test_graph_decode_equals_eager_and_transformers(loaded, name):
    hf, ours = loaded(name)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 19, 3, 11)]
    graph = Engine(ours, max_seqs=4, max_seq_len=64, cuda_graphs=True, graph_buckets=(4,))
    eager = Engine(ours, max_seqs=4, max_seq_len=64, cuda_graphs=False)
    for p in prompts:
        graph.add(p)
        eager.add(p)
    seqs = [list(p) for p in prompts]
    for step in range(8):
        a, b = graph.step(), eager.step()
        assert sorted(a) == sorted(b) == [0, 1, 2, 3]
        for s in range(4):
            if step:   # decode steps: the replayed graph against the eager step (same shapes, same kernels)
                torch.testing.assert_close(a[s], b[s], rtol=0, atol=1e-2 * b[s].abs().max().item())
            tok = int(b[s].argmax())
            graph.feed(s, tok)
            eager.feed(s, tok)
            seqs[s].append(tok)
    assert graph.graphs.replays == 7
    with torch.no_grad():   # and each sequence's last logits against transformers over its whole text
        for s in range(4):
            ref = hf(torch.tensor([seqs[s][:-1]], device="cuda")).logits[0, -1]
            _close(a[s], ref)


def test_batch_decodes_like_each_alone(loaded):
    _, ours = loaded("llama")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (7, 30, 2, 15)]
    eng = Engine(ours, max_seqs=4, max_seq_len=64)
    slots = [eng.add(p) for p in prompts]
    together = eng.step()
    for s, p in zip(slots, prompts):
        alone = Engine(ours, max_seqs=1, max_seq_len=64)
        alone.add(p)
        _close(together[s], alone.step()[0], rel=2e-2)
    assert all(len(x) == 6 for x in generate(ours, prompts, max_new_tokens=6))


def test_greedy_generation_from_self_feeding_graphs_equals_eager(loaded):
    _, ours = loaded("llama")
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 17, 2, 9)]
    a = generate(ours, prompts, max_new_tokens=12)                      # graphs, tokens fed on the device
    engine = ours._engine
    stop = a[1][5]    # a sequence leaves while the others go on (smaller buckets are captured)
    c = generate(ours, prompts, max_new_tokens=12, stop_tokens=[stop])
    assert c == [x[: x.index(stop) + 1] if stop in x else x for x in a]
    captured = dict(engine.graphs._graphs)
    assert captured
    # the next call reuses the engine and its graphs: nothing is captured again
    assert generate(ours, prompts, max_new_tokens=12) == a
    assert ours._engine is engine and engine.graphs._graphs.keys() == captured.keys()
    assert all(engine.graphs._graphs[k] is captured[k] for k in captured)
    b = generate(ours, prompts, max_new_tokens=12, cuda_graphs=False)   # eager steps, tokens from the host
    assert a == b and all(len(x) == 12 for x in a)
    ours.release_engine()


def decode_logits(model, prompts, steps, token, *, fused=True, graphs=False):
    """The logits [len(prompts), V] of each of `steps` engine steps (the prompts' prefill, then
    decode), with model.fused_decode = `fused` (restored after) and CUDA graphs or eager steps;
    after step i, sequence s is fed token(i, s, logits so far)."""
    model.fused_decode = fused
    try:
        eng = Engine(model, max_seqs=len(prompts), max_seq_len=64, cuda_graphs=graphs,
                     graph_buckets=(len(prompts),))
        for p in prompts:
            eng.add(p)
        out = []
        for step in range(steps):
            res = eng.step()
            out.append(torch.stack([res[s] for s in range(len(prompts))]))
            for s in range(len(prompts)):
                eng.feed(s, token(step, s, out))
        return out
    finally:
        model.fused_decode = True


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma", "qwen3", "gemma3_text", "phi3"])
def test_fused_decode_step_equals_unfused(loaded, name):
    """Decode steps on the fused small-token products (norms in the prologues, activation and
    residual adds in the epilogues; Qwen2's q/k/v bias, Gemma's 1 + w norms, Qwen3's q/k norms, Gemma 3's
    (1 + w) ones)
    give the unfused step's logits, eager and from CUDA graphs, and transformers'."""
    hf, ours = loaded(name)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 13, 9)]
    x = torch.zeros(3, ours.spec.hidden_size, dtype=torch.bfloat16, device="cuda")
    assert ours.fuses(x) and not ours.fuses(torch.zeros(17, ours.spec.hidden_size, dtype=torch.bfloat16,
                                                           device="cuda"))

    def token(step, s, out):   # the prefill's greedy token, then fixed ones
        return int(out[0][s].argmax()) if step == 0 else (step * 7 + s) % 96
    runs = {(fused, graphs): decode_logits(ours, prompts, 5, token, fused=fused, graphs=graphs)
            for fused, graphs in ((True, False), (False, False), (True, True))}
    for step in range(1, 5):   # decode steps
        _close(runs[True, False][step], runs[False, False][step], rel=2e-2)
        _close(runs[True, True][step], runs[True, False][step], rel=1e-2)
    seq = prompts[1] + [int(runs[True, False][0][1].argmax())] + [(step * 7 + 1) % 96 for step in range(1, 4)]
    with torch.no_grad():
        _close(runs[True, False][4][1], hf(torch.tensor([seq], device="cuda")).logits[0, -1])


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_quantised_checkpoint_decodes_on_the_gpu(tmp_path, method):
    """A 4-bit AWQ / GPTQ tiny Llama in bf16 on the GPU: decode steps on the fused quantised
    products (QuantLinear through DecoderLayer.fused) equal the unfused steps and follow
    transformers with the dequantised weights."""
    import layerforge as lf

    from ..models.test_quantized_pretrained import quantised_checkpoint
    hf = quantised_checkpoint("llama", tmp_path, method, head_dim=64).to("cuda")
    _quantised_decode_follows(lf.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda"), hf, 12, 3e-2)


def _quantised_decode_follows(ours, hf, seed: int, rel_hf: float, rel_fused: float = 2e-2) -> None:
    """Decode steps of a quantised model: fused (the quantised small-token products with the norms
    and residual adds) equal to unfused within rel_fused, and near transformers' logits (rel_hf)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 12)]
    runs = {fused: decode_logits(ours, prompts, 4, lambda step, s, out: (step * 5 + s) % 96, fused=fused)
            for fused in (True, False)}
    for step in range(1, 4):
        _close(runs[True][step], runs[False][step], rel=rel_fused)
    seq = prompts[0] + [(step * 5) % 96 for step in range(3)]
    with torch.no_grad():
        _close(runs[True][3][0], hf(torch.tensor([seq], device="cuda")).logits[0, -1], rel=rel_hf)


@pytest.mark.parametrize("layout, strategy", [("fp8", "block"), ("compressed-tensors", "channel")])
def test_fp8_checkpoint_decodes_on_the_gpu(tmp_path, layout, strategy):
    """An FP8 tiny Llama (transformers' fp8 blocks, compressed-tensors channels) in bf16 on an
    sm_89+ GPU: decode steps on the fused W8A8 products equal the unfused steps within half an e4m3
    step (6.25 %: the fused prologue rounds the norm's product to bf16 in another order than the row
    kernel, and a bf16 step's difference sends a few activations to the neighbouring e4m3 value;
    measured 3.9 %) and follow transformers with the dequantised weights within the activations'
    e4m3 rounding."""
    import layerforge as lf

    from ..models.test_quantized_pretrained import fp8_checkpoint
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the f8e4m3 products need sm_89 or newer")
    hf, _ = fp8_checkpoint(tmp_path, layout, strategy)
    _quantised_decode_follows(lf.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda"), hf.to("cuda"), 13, 1e-1,
                              rel_fused=6.25e-2)


@pytest.fixture(scope="module")
def loaded_f32(tmp_path_factory):
    return tiny_loader(tmp_path_factory, head_dim=64, dtype=torch.float32, device="cuda")


@pytest.mark.parametrize("name", [name for name in FAMILIES if name not in MLA_FAMILIES])   # latent cache: 16-bit
def test_f32_logits_and_greedy_generation_equal_transformers(loaded_f32, name):
    """float32 on the GPU (the CUDA-core attention kernel and an f32 paged cache): logits close to
    transformers' and 16 greedy tokens identical, from eager steps and from self-feeding graphs."""
    hf, ours = loaded_f32(name)
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours(ids)
    assert got.dtype == torch.float32 and not got.isnan().any()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    prompt = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, 7:].tolist()
    assert generate(ours, [prompt[0].tolist()], max_new_tokens=16) == [want]
    assert generate(ours, [prompt[0].tolist()], max_new_tokens=16, cuda_graphs=False) == [want]
    ours.release_engine()


@pytest.fixture(scope="module")
def loaded_d96(tmp_path_factory):
    return tiny_loader(tmp_path_factory, head_dim=96, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("name", ["phi3", "gpt_neox", "llama"])
def test_head_dim_96_runs_on_the_tensor_cores(loaded_d96, name):
    """Phi-3 and GPT-NeoX-20B have head dim 96: attention takes the padded tensor-core kernels
    (prefill and decode), logits match transformers and graph decode equals eager."""
    hf, ours = loaded_d96(name)
    assert ours.layers[0].attn.attn.kernel == "tc"
    ids = torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
    _close(ours(ids), ref)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    assert generate(ours, prompts, max_new_tokens=6) == generate(ours, prompts, max_new_tokens=6, cuda_graphs=False)
    ours.release_engine()


@pytest.mark.skipif(torch.cuda.get_device_capability() != (9, 0), reason="the generated Hopper GEMM is sm_90's")
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma"])
def test_prefill_on_the_generated_gemm(loaded, name, monkeypatch):
    """With runtime/linear.WGMMA_MIN_ROWS lowered, the longer steps' float projections run on the
    generated Hopper GEMM (gate/up with the activation fused): logits still match transformers."""
    from layerforge.runtime import linear
    hf, ours = loaded(name)
    monkeypatch.setattr(linear, "WGMMA_MIN_ROWS", 17)
    calls = []
    launcher = linear._gemm_launcher
    monkeypatch.setattr(linear, "_gemm_launcher", lambda *a, **k: calls.append(a[1:3]) or launcher(*a, **k))
    ids = torch.randint(0, 96, (2, 29), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        ref = hf(ids).logits
    _close(ours(ids), ref)
    layers = len(ours.layers)
    assert len(calls) >= 4 * layers, calls   # q/k/v, o, gate/up (activation fused), down a layer


@pytest.mark.parametrize("name", MLA_FAMILIES)
def test_mla_prefill_logits_match_transformers_where_the_routing_agrees(loaded, name):
    """DeepSeek in bf16, a prefill of 4 x 37 tokens (latent attention's non-absorbed form, the
    grouped or softmax routing kernel, the experts on the grouped products): where every MoE layer
    chose transformers' experts, transformers' logits."""
    hf, ours = loaded(name)
    ids = torch.randint(0, 96, (4, 37), generator=torch.Generator().manual_seed(1)).cuda()
    got, ref, agree = routed_logits(hf, ours, ids)
    assert agree.sum() >= ids.numel() // 4, agree.sum(-1)
    agree = agree.to(got.device)
    # bf16 through three layers of latent attention and experts, both sides: 3.1 % of the largest
    # logit measured (deepseek_v2, H200), so 4 %
    _close(got[agree], ref[agree], rel=4e-2)


@pytest.mark.parametrize("name", MLA_FAMILIES)
def test_mla_decode_kernel_steps_follow_transformers_where_the_routing_agrees(loaded, name, monkeypatch):
    """bf16 decode steps over the paged latent cache run the MLA decode kernel (absorbed form); each
    step's logits are transformers' over the text so far where every MoE layer routed the text as
    transformers did (for the position and those before it); three sequences decode together."""
    hf, ours = loaded(name)
    calls = []
    kernel = MLADecode.__call__
    monkeypatch.setattr(MLADecode, "__call__",
                        lambda self, q, *a, **k: calls.append(q.shape[0]) or kernel(self, q, *a, **k))
    mine, theirs = [], []    # each MoE call's expert ids (ours: a step's tokens; transformers': the text's)

    def recording(route):
        def record(x):
            weights, ids = route(x)
            mine.append(ids.long().sort(-1).values.cpu())
            return weights, ids
        return record
    moes = [layer.mlp for layer in ours.layers if isinstance(layer.mlp, moe.MoE)]
    for m in moes:
        monkeypatch.setattr(m, "route", recording(m.route))
    prompt = torch.randint(0, 96, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    eng = Engine(ours, max_seqs=1, max_seq_len=64)
    eng.add(prompt)
    text, logits = list(prompt), []
    for step in range(8):                    # the prefill, then 7 decode steps
        logits.append(eng.step()[0])
        tok = (5 * step + 1) % 96
        eng.feed(0, tok)
        text.append(tok)
    assert calls == [1] * 7 * len(ours.layers)
    hooks = [layer.mlp.gate.register_forward_hook(lambda mod, args, out: theirs.append(out[2].sort(-1).values.cpu()))
             for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    with torch.no_grad():
        ref = hf(torch.tensor([text[:-1]], device="cuda")).logits[0, len(prompt) - 1:]
    for h in hooks:
        h.remove()
    n = len(moes)
    ours_routes = [torch.cat(mine[j::n]) for j in range(n)]   # per MoE layer: [16, k]
    agree = torch.stack([(a == b).all(-1) for a, b in zip(ours_routes, theirs)]).all(0).cumprod(0).bool()
    agree = agree[len(prompt) - 1:]
    assert agree.sum() >= 4, agree
    _close(torch.stack(logits)[agree.cuda()], ref[agree.cuda()])
    calls.clear()
    out = generate(ours, [[1, 2, 3], [4, 5, 6, 7, 8], [9]], max_new_tokens=4)
    assert all(len(x) == 4 for x in out) and 3 in calls and ours._engine.graphs is None
    ours.release_engine()


def test_longrope_decode_crosses_to_the_long_factors(loaded):
    """Phi-3's LongRoPE on the GPU (bf16): the engine's eager steps follow transformers' generate across
    original_max_position (16 in the tiny config: the crossing sequence run again with the long factors' kernels),
    and a CUDA-graph engine is refused with the reason."""
    from layerforge.models.engine import EngineError
    hf, ours = loaded("phi3_longrope")
    assert not ours.capturable(1)
    with pytest.raises(EngineError, match="LongRoPE"):
        Engine(ours, max_seqs=1, max_seq_len=64, cuda_graphs=True)
    prompt = torch.randint(1, 96, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=14, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    feed = out.sequences[0, 10:-1].tolist()
    for a, b in zip(engine_logits(ours, prompt, feed), out.logits):
        _close(a, b[0])
