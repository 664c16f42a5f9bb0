"""Multi-LoRA through the serving engine on the GPU (models/engine.py, models/graphs.py with
models/lora.py), a tiny Llama in bf16 with four PEFT adapters: an Engine serving sequences of
different adapters (and one without), eagerly or from CUDA graphs, in one prefill step or in
chunks, gives each sequence what it gets alone and PEFT's logits for its adapter; graph replays
equal eager steps while the adapter mix changes between replays of one captured graph; greedy
generation with adapters from self-feeding graphs equals eager generation; attaching and
detaching adapters drops the graphs captured before; a step whose LoRA routes cannot be captured
(float32: the torch route) runs eagerly with its reason counted, never a replay."""
from __future__ import annotations

import pytest
import torch

from layerforge.models.engine import Engine, generate

from ..models.lora_adapters import peft_logits
from ..seeding import seeded_generator

pytest.importorskip("peft")
NAMES = ["a2", None, "a0", "a3"]
NEW = 6   # logits taken per sequence (the prompt's last, then after each of NEW - 1 fed tokens)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(PeftModel with a0..a3 on the GPU in float32, adapters' folders, a loader of the checkpoint
    on the GPU, a bf16 model with all four attached)."""
    import layerforge as lf
    from layerforge.models.lora import attach_adapters

    from ..models.hf_tiny import make_tiny
    from ..models.lora_adapters import make_adapters, peft_with
    root = tmp_path_factory.mktemp("lora_engine_gpu")
    hf = make_tiny("llama", root / "base", head_dim=64)    # hidden 256: the LoRA kernels' sizes
    folders = make_adapters(hf, "llama", root)

    def load(dtype=torch.bfloat16):
        return lf.from_pretrained(root / "base", dtype=dtype, device="cuda")
    model = load()
    attach_adapters(model, folders)
    return peft_with(hf, folders).cuda(), folders, load, model


def draw(case, lengths):
    g = seeded_generator("lora_engine_gpu", case)
    return [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]


def serve(engine: Engine, prompts, adapters, forced):
    """Every prompt joins with its adapter; each sequence then takes its tokens of `forced` (so
    that runs compare position by position whatever the rounding). Returns per prompt its
    logits [NEW, V] (float32)."""
    slots = [engine.add(p, adapter=a) for p, a in zip(prompts, adapters)]
    out = {s: [] for s in slots}
    while engine.seqs:
        for s, row in engine.step().items():
            out[s].append(row.float().clone())
            k = len(out[s])
            if k == NEW:
                engine.release(s)
            else:
                engine.feed(s, forced[slots.index(s)][k - 1])
    return [torch.stack(out[s]) for s in slots]


def close(got, ref, rel):
    assert not got.isnan().any()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize("graphs,chunk", [(False, 2048), (True, 2048), (True, 48)],
                         ids=["eager", "graphs", "graphs-chunked"])
def test_each_sequence_gets_what_it_gets_alone_and_pefts_logits(tiny, graphs, chunk):
    """Prompts of 37, 50, 23 and 70 tokens: one prefill step of 180 tokens (the dense route), or
    chunks of 48 (the kernels) mixing prompts and decode tokens of different adapters."""
    pm, _, _, model = tiny
    prompts = draw("prompts", (37, 50, 23, 70))
    forced = draw("forced", (NEW - 1,) * 4)
    engine = Engine(model, max_seqs=4, max_seq_len=96, prefill_chunk=chunk, cuda_graphs=graphs, graph_buckets=(4,))
    together = serve(engine, prompts, NAMES, forced)
    if graphs:
        assert engine.graphs.replays > 0 and engine.eager_steps == {}
    for prompt, name, f, got in zip(prompts, NAMES, forced, together):
        alone = serve(Engine(model, max_seqs=1, max_seq_len=96, cuda_graphs=graphs), [prompt], [name], [f])[0]
        close(got, alone, 2e-2)
        ref = peft_logits(pm, torch.tensor([prompt + f], device="cuda"), name)[0, len(prompt) - 1:]
        close(got, ref.float(), 3e-2)


def test_graph_replays_equal_eager_steps_when_the_adapter_mix_changes(tiny):
    """One graph (bucket 4) serves every mix: sequences leave and others join in their slots with
    other adapters; each decode step's replay equals the eager step of the same sequences."""
    _, _, _, model = tiny
    graph = Engine(model, max_seqs=4, max_seq_len=64, cuda_graphs=True, graph_buckets=(4,))
    eager = Engine(model, max_seqs=4, max_seq_len=64, cuda_graphs=False)
    prompts = draw("mix", (9, 14, 5, 11, 7, 12))
    g = seeded_generator("lora_engine_gpu", "mix tokens")
    # (sequence index leaving, (prompt, adapter) joining) between rounds of decode steps
    plan = [(None, None), (1, (prompts[4], "a1")), (3, (prompts[5], None)), (0, None)]
    for e in (graph, eager):
        for p, a in zip(prompts[:4], ["a0", "a2", None, "a3"]):
            e.add(p, adapter=a)
    decodes = 0
    for leave, join in plan:
        for e in (graph, eager):
            if leave is not None:
                e.release(leave)
            if join is not None:
                assert e.add(join[0], adapter=join[1]) == leave   # the slot of the one that left
        for _ in range(4):
            decoding = all(len(s.tokens) - s.fed == 1 for s in graph.seqs.values())   # a replay, not a prefill
            a, b = graph.step(), eager.step()
            assert sorted(a) == sorted(b) == sorted(graph.seqs)
            for s in a:
                if decoding:
                    torch.testing.assert_close(a[s], b[s], rtol=0, atol=1e-2 * b[s].abs().max().item())
                tok = int(torch.randint(0, 96, (), generator=g))
                graph.feed(s, tok)
                eager.feed(s, tok)
            decodes += decoding
    assert decodes == 13 and len(graph.graphs._graphs) == 1 and graph.graphs.replays == decodes
    assert graph.eager_steps == {}


def test_greedy_generation_with_adapters_from_graphs_equals_eager(tiny):
    _, _, _, model = tiny
    prompts = draw("greedy", (6, 17, 2, 9))
    a = generate(model, prompts, max_new_tokens=10, adapters=NAMES)          # self-feeding graphs
    engine = model._engine
    assert engine.graphs is not None and engine.graphs._graphs and engine.eager_steps == {}
    stop = a[2][4]    # a sequence leaves while the others go on: smaller buckets, another mix
    c = generate(model, prompts, max_new_tokens=10, adapters=NAMES, stop_tokens=[stop])
    assert c == [x[: x.index(stop) + 1] if stop in x else x for x in a]
    b = generate(model, prompts, max_new_tokens=10, adapters=NAMES, cuda_graphs=False)   # eager steps
    assert a == b and all(len(x) == 10 for x in a)
    model.release_engine()


def test_attaching_and_detaching_drops_the_captured_graphs(tiny):
    from layerforge.models.lora import attach_adapters
    _, folders, load, _ = tiny
    model = load()
    prompts = draw("attach", (8, 13))
    forced = draw("attach forced", (NEW - 1, NEW - 1))
    graph = Engine(model, max_seqs=2, max_seq_len=64, cuda_graphs=True, graph_buckets=(2,))

    def both(adapters):
        got = serve(graph, prompts, adapters, forced)
        want = serve(Engine(model, max_seqs=2, max_seq_len=64, cuda_graphs=False), prompts, adapters, forced)
        for x, y in zip(got, want):      # the decode steps: replays against eager steps
            close(x, y, 1e-2)
    both([None, None])
    first = graph.graphs._graphs[2][0]
    attached = attach_adapters(model, {n: folders[n] for n in ("a1", "a3")})
    both(["a3", "a1"])
    assert graph.graphs.recaptures == 1 and graph.graphs._graphs[2][0] is not first
    attached.detach()
    both([None, None])
    assert graph.graphs.recaptures == 2 and graph.eager_steps == {}


def test_steps_whose_routes_cannot_be_captured_run_eagerly_with_the_reason(tiny):
    """float32 adapters take the torch route (it reads each adapter's tokens on the host): the
    engine's decode steps run eagerly, counted under the reason, and equal an engine without
    graphs; the graphs refuse such a step outright."""
    from layerforge.models.lora import attach_adapters
    pm, folders, load, _ = tiny
    model = load(torch.float32)
    attach_adapters(model, folders)
    prompts = draw("f32", (12, 5, 9, 20))
    forced = draw("f32 forced", (NEW - 1,) * 4)
    graph = Engine(model, max_seqs=4, max_seq_len=64, cuda_graphs=True)
    got = serve(graph, prompts, NAMES, forced)
    assert graph.graphs is not None and graph.graphs.replays == 0
    [(why, count)] = graph.eager_steps.items()
    assert "the torch route (torch.float32 on cuda" in why and count == NEW - 1
    want = serve(Engine(model, max_seqs=4, max_seq_len=64, cuda_graphs=False), prompts, NAMES, forced)
    for x, y, prompt, name, f in zip(got, want, prompts, NAMES, forced):
        close(x, y, 1e-5)
        close(x, peft_logits(pm, torch.tensor([prompt + f], device="cuda"), name)[0, len(prompt) - 1:], 1e-4)
    with pytest.raises(ValueError, match=r"cannot replay a CUDA graph: layers\.0\.\S+: the torch route"):
        graph.graphs.decode([1], [0], [0])
    assert generate(model, prompts, max_new_tokens=5, adapters=NAMES) == \
        generate(model, prompts, max_new_tokens=5, adapters=NAMES, cuda_graphs=False)
    model.release_engine()
