"""Multi-LoRA through the serving engine (models/engine.py with models/lora.py), on the CPU: a tiny
random Llama with four PEFT adapters attached; an Engine serving four sequences, three with
different adapters and one without, gives each sequence, token for token, the logits and greedy
tokens it gets alone with its adapter and PEFT's logits for that adapter; chunked prefill steps
that mix prefill chunks and decode tokens of different adapters run each token under its own
sequence's adapter; generate(adapters=...) equals per-prompt generation and PEFT's greedy tokens;
an adapter the model does not have is an EngineError before anything changes; what drops
captured CUDA graphs (adapter_stamp) and why a CPU step cannot be captured."""
from __future__ import annotations

import pytest
import torch

from layerforge.models.engine import Engine, EngineError, generate
from layerforge.models.lora import PeftAdapter, adapter_stamp, attach_adapters, read_peft_adapter

from .hf_tiny import make_tiny
from .lora_adapters import make_adapters, peft_logits, peft_with

pytest.importorskip("peft")
pytest.importorskip("transformers")

PROMPTS = [[5, 17, 3, 88, 41, 9, 60, 2, 33], [71, 4, 19, 50, 8, 27], [12, 90, 64, 7, 45, 31, 23, 77, 6, 58, 14],
           [39, 80, 1, 66]]
NAMES = ["a1", None, "a3", "a0"]   # three adapters of ranks 16, 64 and 8, and one sequence on the base model
NEW = 3                            # tokens decoded per sequence


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(PeftModel with a0..a3, the adapters' folders, a loader of the checkpoint, a model with
    all four attached)."""
    import layerforge as lf
    root = tmp_path_factory.mktemp("lora_engine")
    hf = make_tiny("llama", root / "base")
    folders = make_adapters(hf, "llama", root)

    def load():
        return lf.from_pretrained(root / "base", dtype=torch.float32)
    model = load()
    attach_adapters(model, folders)
    return peft_with(hf, folders), folders, load, model


@pytest.fixture(scope="module")
def served(llama):
    """serve() of PROMPTS with NAMES by one engine, every prompt in one prefill step."""
    return serve(Engine(llama[3], max_seqs=4, max_seq_len=32), PROMPTS, NAMES)


def _close(got, ref, rel=1e-4):
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * ref.abs().max().item())


def serve(engine: Engine, prompts, adapters, new: int = NEW):
    """Every prompt joins with its adapter; greedy decoding until each has `new` tokens. Returns
    per prompt (its new tokens, the logits [new, V] each was drawn from)."""
    slots = [engine.add(p, adapter=a) for p, a in zip(prompts, adapters)]
    toks: dict[int, list[int]] = {s: [] for s in slots}
    logits: dict[int, list[torch.Tensor]] = {s: [] for s in slots}
    while engine.seqs:
        for s, row in engine.step().items():
            tok = int(row.argmax())
            toks[s].append(tok)
            logits[s].append(row.clone())
            if len(toks[s]) == new:
                engine.release(s)
            else:
                engine.feed(s, tok)
    return [(toks[s], torch.stack(logits[s])) for s in slots]


def peft_greedy(pm, prompt, adapter, new: int = NEW) -> list[int]:
    ids = list(prompt)
    for _ in range(new):
        ids.append(int(peft_logits(pm, torch.tensor([ids]), adapter)[0, -1].argmax()))
    return ids[len(prompt):]


def test_each_sequence_gets_what_it_gets_alone_and_pefts_logits(llama, served):
    pm, _, _, model = llama
    together = served
    for prompt, name, (toks, logits) in zip(PROMPTS, NAMES, together):
        alone_toks, alone_logits = serve(Engine(model, max_seqs=1, max_seq_len=32), [prompt], [name])[0]
        assert toks == alone_toks
        _close(logits, alone_logits, rel=1e-5)
        # PEFT over the whole text: the logits at the prompt's last position and at each fed token
        ref = peft_logits(pm, torch.tensor([prompt + toks[:-1]]), name)[0, len(prompt) - 1:]
        _close(logits, ref)
    base = peft_logits(pm, torch.tensor([PROMPTS[0]]), None)[0, -1]
    assert (together[0][1][0] - base).abs().max() > 0.05 * base.abs().max()   # the adapter changes the logits


def test_chunked_prefill_steps_mix_adapters_token_by_token(llama, served, monkeypatch):
    """prefill_chunk 5: steps hold chunks of several prompts and decode tokens of sequences whose
    prompts are in, of different adapters (two named by slot); each token runs with its own
    sequence's adapter, and every sequence gets what it gets in one prefill step."""
    pm, _, _, model = llama
    attached = model.__dict__["_lora_adapters"]
    seen = []
    step = model.step

    def spy(tokens, seq_ids, cache, **kw):   # the adapter choice each model step runs under
        batch = attached.context.batch
        decoding = {s for s in seq_ids if engine.seqs[s].new}   # sequences past their prompts
        seen.append((list(seq_ids), None if batch is None else batch.ids.tolist(), decoding))
        return step(tokens, seq_ids, cache, **kw)
    monkeypatch.setattr(model, "step", spy)
    engine = Engine(model, max_seqs=4, max_seq_len=32, prefill_chunk=5)
    by_slot = [1, None, "a3", 0]                       # a1 and a0 by their slots
    chunked = serve(engine, PROMPTS, by_slot)
    slot_of = {s: -1 if n is None else attached.index(n) for s, n in enumerate(NAMES)}
    for seq_ids, ids, _ in seen:
        want = [slot_of[s] for s in seq_ids]
        assert ids == want or (ids is None and set(want) == {-1})
    # steps holding a decode token and a prefill chunk of another adapter
    assert any(slot_of[d] != slot_of[p] for q, _, dec in seen for d in dec for p in set(q) - dec if q.count(p) > 1)
    for (toks, logits), (wtoks, wlogits), prompt, name in zip(chunked, served, PROMPTS, NAMES):
        assert toks == wtoks
        _close(logits, wlogits, rel=1e-5)
        _close(logits[0], peft_logits(pm, torch.tensor([prompt]), name)[0, -1])


def test_generate_with_adapters_equals_each_prompt_alone_and_peft(llama, served):
    pm, _, _, model = llama
    got = generate(model, PROMPTS, max_new_tokens=NEW, adapters=NAMES)
    for prompt, name, toks, (engine_toks, _) in zip(PROMPTS, NAMES, got, served):
        # the prompt without an adapter alone: adapters=None, today's call (the base model)
        alone = generate(model, [prompt], max_new_tokens=NEW, **({} if name is None else {"adapters": [name]}))
        assert toks == alone[0] == engine_toks   # (the engine's: PEFT's logits, the first test)
    assert got[2] != peft_greedy(pm, PROMPTS[2], None)   # the adapter changes the tokens
    model.release_engine()


def test_an_adapter_the_model_does_not_have_is_an_error_before_anything_changes(llama):
    pm, folders, load, model = llama
    engine = Engine(model, max_seqs=2, max_seq_len=32)
    a = engine.add(PROMPTS[0], adapter="a2")
    assert engine.adapter(a) == "a2"
    free = list(engine._free)
    for bad, match in (("sql", r"no adapter 'sql' \(attached: a0, a1, a2, a3\)"), (4, "slot 4 holds no adapter"),
                       (-1, "slot -1 holds no adapter"), (1.0, "a name, a slot")):
        with pytest.raises(EngineError, match=match):
            engine.add(PROMPTS[1], adapter=bad)
        assert list(engine.seqs) == [a] and engine._free == free
    with pytest.raises(EngineError, match="no adapters attached"):
        Engine(load(), max_seqs=1, max_seq_len=32).add(PROMPTS[1], adapter="a0")
    with pytest.raises(EngineError, match="generate: no adapter 'sql'"):
        generate(model, PROMPTS[:2], max_new_tokens=2, adapters=["a0", "sql"])
    with pytest.raises(EngineError, match="one adapter a prompt: 1 for 2 prompts"):
        generate(model, PROMPTS[:2], max_new_tokens=2, adapters=["a0"])
    assert getattr(model, "_engine", None) is None   # nothing was built or added


def test_a_sequence_whose_adapter_was_unloaded_stops_the_step_before_it_changes_anything(llama):
    pm, folders, load, _ = llama
    model = load()
    attached = attach_adapters(model, {"a0": folders["a0"], "a1": folders["a1"]})
    engine = Engine(model, max_seqs=2, max_seq_len=32, prefill_chunk=4)
    a, b = engine.add(PROMPTS[0], adapter="a1"), engine.add(PROMPTS[1])
    engine.step()                                      # a's first chunk
    attached.unload("a1")
    fed = [engine.seqs[s].fed for s in (a, b)]
    with pytest.raises(EngineError, match="sequence 0's adapter 'a1' is gone"):
        engine.step()
    assert [engine.seqs[s].fed for s in (a, b)] == fed
    engine.release(a)
    engine.release(b)
    assert serve(engine, [PROMPTS[2]], ["a0"], new=1)[0][0] == peft_greedy(pm, PROMPTS[2], "a0", new=1)
    engine.add(PROMPTS[3], adapter="a0")
    attached.detach()
    with pytest.raises(EngineError, match="sequence 0's adapter 'a0' is gone: the model's adapters were detached"):
        engine.step()


def test_what_changes_the_modules_changes_the_stamp(llama):
    """adapter_stamp (models/graphs.py drops graphs captured under another): attaching, a load that
    wraps a projection no adapter had, and detaching change it; loads and unloads into existing
    stores (written in place) do not. A CPU step takes the torch route: capture_blocker says so."""
    _, folders, load, _ = llama
    model = load()
    assert adapter_stamp(model) == 0
    full = read_peft_adapter(folders["a0"])
    q_only = PeftAdapter("q", full.config, {k: v for k, v in full.modules.items() if k.endswith("layers.0.self_attn.q_proj")})
    attached = attach_adapters(model, {"q": q_only}, slots=2, max_rank=64)
    s1 = adapter_stamp(model)
    assert s1 != 0 and list(attached.modules) == ["layers.0.attn.qkv"]
    attached.load("a1", folders["a1"])                 # every other projection is wrapped now
    s2 = adapter_stamp(model)
    assert s2 != s1
    attached.unload("a1")
    attached.load("a3", folders["a3"])
    assert adapter_stamp(model) == s2
    why = attached.capture_blocker(8)
    assert why.startswith("layers.0.attn.qkv: the torch route (torch.float32 on cpu") and "reads each" in why
    attached.detach()
    assert adapter_stamp(model) not in (0, s1, s2)


def test_the_engine_benchmark_runs_on_the_cpu(tmp_path, capsys):
    """benchmarks/bench_lora.py's engine cases (a GPU measures them): decode on the base model,
    unfused, and with adapters mixed over the sequences; a prefill of prompts on their adapters
    against the same prompts on the base model; once each here."""
    import json

    from benchmarks.bench_lora import main
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--dims", "64,64,16,96", "--cases", "engine:3,engine-prefill:8", "--layers", "1",
                 "--context", "4", "--adapters", "2", "--rank", "8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["run"] for r in rows] == ["base", "base unfused", "lora", "base", "lora"]
    assert all(r["step_s"] > 0 for r in rows[:3]) and all(r["prefill_s"] > 0 for r in rows[3:])
    text = capsys.readouterr().out
    assert "engine decode, 3 sequences of 4 tokens" in text and "engine prefill, 2 prompts of 4 tokens" in text
