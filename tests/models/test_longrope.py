"""Phi-3's long-context RoPE (LongRoPE with both factor sets, no fixed regime) through lf.from_pretrained on the
CPU: the model holds each attention block twice (short and long factors: one constant frequency table each); a
step takes the long one for the sequences whose whole length passes original_max_position, and the engine runs a
sequence that crosses it again from its start with the long factors, as transformers' Phi-3 generation drops its
cache at that step. Checked step by step against transformers' generate across the switch, alone and in a batch
whose sequences cross at different steps; the check can tell (short factors throughout differ after the switch)."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.models.engine import Engine
from layerforge.models.families import definitions_for, spec_from_config

from .hf_tiny import engine_logits, make_tiny, tiny_configs

transformers = pytest.importorskip("transformers")


def test_longrope_switches_to_the_long_factors_past_the_original_length(tmp_path):
    hf = make_tiny("phi3_longrope", tmp_path)
    ours = lf.from_pretrained(tmp_path, dtype=torch.float32)
    assert all(layer.attn.long is not None and layer.attn.long[0] == 16.0 for layer in ours.layers)
    assert not ours.capturable(1)   # the regime is the host's choice a step: eager decode
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(1, 96, (10,), generator=g).tolist()
    # transformers' own cached greedy decoding: the prompt (short factors), then one token a step, positions 10 ..
    # 23: past 16 (the long factors) from the 7th step
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=14, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
    feed = out.sequences[0, 10:-1].tolist()
    ref = [x[0] for x in out.logits]
    got = engine_logits(ours, prompt, feed)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=f"step {i}")
    # the short factors throughout match up to position 16 and not after: the steps above tell the two apart
    for layer in ours.layers:
        layer.attn.long = None
    short = engine_logits(ours, prompt, feed)
    err = [(a - b).abs().max().item() / b.abs().max().item() for a, b in zip(short, ref)]
    assert max(err[:7]) < 1e-4 and max(err[7:]) > 1e-3, err


def test_longrope_builds_both_regimes():
    """definitions_for (what a pack builds) lists the attention block with its short and with its long factors."""
    cls, kw = tiny_configs()["phi3_longrope"]
    spec = spec_from_config(getattr(transformers, cls)(**kw).to_dict())
    attn = [b for n, b in definitions_for(spec) if n == "decoder_attn"]
    assert [b.get("rope_regime") for b in attn] == ["short", "long"]
    prog = lf.stdlib()
    for b in attn:   # each specialises to one constant table
        layer = prog.specialise("decoder_attn", dtype="bf16", **b)
        assert layer.function.outputs[0].arg.rope.scaling.regime == b["rope_regime"]


def test_longrope_batch_steps_each_sequence_with_its_own_factors(tmp_path):
    """Two sequences decoding together, crossing original_max_position at different steps: each step runs the short
    and the long sequences apart (one set of factors a model step), and each sequence's logits are transformers'
    generate's for it alone."""
    hf = make_tiny("phi3_longrope", tmp_path)
    ours = lf.from_pretrained(tmp_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 96, (n,), generator=g).tolist() for n in (11, 4)]
    refs, feeds = [], []
    for p in prompts:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
        feeds.append(out.sequences[0, len(p):-1].tolist())
        refs.append([x[0] for x in out.logits])
    eng = Engine(ours, max_seqs=2, max_seq_len=64, cuda_graphs=False)
    slots = [eng.add(p) for p in prompts]
    for step in range(16):
        got = eng.step()
        assert sorted(got) == sorted(slots)
        for i, slot in enumerate(slots):
            ref = refs[i][step]
            torch.testing.assert_close(got[slot], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(),
                                       msg=f"sequence {i} step {step}")
            if step < 15:
                eng.feed(slot, feeds[i][step])
