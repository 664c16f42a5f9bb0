"""PEFT LoRA adapters on whole models (models/lora.py), on the CPU: a tiny random Llama with four
adapters of ranks 8, 16, 32 and 64 on q, k, v, o, gate, up and down (rsLoRA, alpha_pattern and
rank_pattern among them), saved with save_pretrained and attached together, gives each prompt of
one batch PEFT's logits for its adapter alone (and the base model's for a prompt without one),
in prefill and in a decode step that mixes the adapters token by token; the families whose
checkpoints fuse q/k/v or gate/up (Phi-3) or interleave heads (GPT-NeoX, Falcon), Conv1D (GPT-2)
and biases (Qwen2) too; loading, unloading, detaching; what is not served."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from layerforge.models.lora import attach_adapters, read_peft_adapter
from layerforge.models.spec import ConfigError
from layerforge.runtime.lora import LoRALinear

from .hf_tiny import make_tiny
from .lora_adapters import RANKS, make_adapters, peft_logits, peft_with

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(transformers model, its PeftModel with a0..a3, the adapters' folders, the checkpoint folder)."""
    import layerforge as lf
    root = tmp_path_factory.mktemp("lora_llama")
    hf = make_tiny("llama", root / "base")
    folders = make_adapters(hf, "llama", root)
    return hf, peft_with(hf, folders), folders, lambda: lf.from_pretrained(root / "base", dtype=torch.float32)


def _close(got, ref):
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_each_prompt_gets_its_adapters_logits(llama):
    hf, pm, folders, load = llama
    model = load()
    adapters = attach_adapters(model, folders)
    assert adapters.names == ("a0", "a1", "a2", "a3") and model.fused_decode is False
    ids = torch.randint(0, 96, (5, 11), generator=torch.Generator().manual_seed(1))
    names = ["a2", None, "a0", "a3", "a1"]
    got = adapters.forward(ids, names)
    base = peft_logits(pm, ids[1:2], None)
    for i, name in enumerate(names):
        ref = peft_logits(pm, ids[i:i + 1], name)
        _close(got[i:i + 1], ref)
        if name is not None:
            assert (ref - base).abs().max() > 0.05 * ref.abs().max()   # the adapter changes the logits


def test_the_stores_hold_the_ranks_and_scales_of_the_configs(llama):
    _, pm, folders, load = llama
    model = load()
    adapters = attach_adapters(model, folders)
    qkv = adapters.modules["layers.0.attn.qkv"].lora
    assert qkv.slices == (64, 32, 32) and qkv.rank == 64
    assert [qkv.adapter_rank(e, 0) for e in range(4)] == list(RANKS)
    assert qkv.adapter_rank(3, 1) == 4                                 # a3's rank_pattern on k_proj
    layer = pm.base_model.model.model.layers[0]
    assert qkv.scales[1, 0].item() == pytest.approx(layer.self_attn.q_proj.scaling["a1"])   # rsLoRA
    assert adapters.modules["layers.1.mlp.down"].lora.scales[2, 0].item() == pytest.approx(
        layer.mlp.down_proj.scaling["a2"])                             # a2's alpha_pattern
    assert sorted(adapters.modules) == sorted(f"layers.{i}.{p}" for i in range(2)
                                              for p in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"))
    assert set(model.state_dict()) == set(load().state_dict())         # the model's names are unchanged


def test_a_decode_step_mixes_adapters_token_by_token(llama):
    """Prefill each prompt with its adapter, then one step of five tokens, each of another adapter
    (and one of none): the step's logits are PEFT's at each prompt's last position."""
    hf, pm, folders, load = llama
    model = load()
    adapters = attach_adapters(model, folders)
    ids = torch.randint(0, 96, (5, 9), generator=torch.Generator().manual_seed(2))
    names = ["a3", "a0", None, "a1", "a2"]
    cache = model.make_cache(num_pages=5 * 2, max_seqs=5, max_pages_per_seq=2)
    for b in range(5):
        cache.allocate(b, 9)
    prompt = ids[:, :8].reshape(-1)
    seq = [b for b in range(5) for _ in range(8)]
    adapters.step(prompt, seq, cache, adapters=[names[b] for b in seq])
    last = adapters.step(ids[:, 8], list(range(5)), cache, adapters=names)
    for i, name in enumerate(names):
        _close(last[i], peft_logits(pm, ids[i:i + 1], name)[0, -1])


def test_without_a_choice_every_token_runs_the_base_model(llama):
    hf, _, folders, load = llama
    model = load()
    attach_adapters(model, folders)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _close(model(ids), hf(ids).logits)


def test_unload_load_and_detach(llama):
    hf, pm, folders, load = llama
    model = load()
    adapters = attach_adapters(model, {"a0": folders["a0"]}, slots=2, max_rank=64)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(4))
    assert adapters.load("a3", folders["a3"]) == 1
    _close(adapters.forward(ids, ["a3", "a0"])[0:1], peft_logits(pm, ids[0:1], "a3"))
    adapters.unload("a0")
    assert adapters.slot_names == [None, "a3"]
    _close(adapters.forward(ids, [None, "a3"])[0:1], peft_logits(pm, ids[0:1], None))
    assert adapters.load("a2", folders["a2"]) == 0
    _close(adapters.forward(ids, ["a2", "a3"])[0:1], peft_logits(pm, ids[0:1], "a2"))
    with pytest.raises(ValueError, match="all 2 slots are taken"):
        adapters.load("a1", folders["a1"])
    adapters.detach()
    assert model.fused_decode is True
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        _close(model(ids), hf(ids).logits)
    attach_adapters(model, {"a1": folders["a1"]}).detach()   # a detached model takes adapters again


@pytest.mark.parametrize("name", ["phi3", "gpt_neox", "falcon", "gpt2", "qwen2"])
def test_other_families(tmp_path, name):
    """Phi-3 fuses q/k/v and gate/up in its checkpoint (one slice each), GPT-NeoX interleaves each
    head's q, k, v rows and Falcon groups them (B's rows reordered as the weight's), GPT-2's
    Conv1D adapters (fan_in_fan_out), Qwen2's q/k/v biases."""
    import layerforge as lf
    hf = make_tiny(name, tmp_path / "base")
    folders = make_adapters(hf, name, tmp_path, ranks=(8, 16))
    pm = peft_with(hf, folders)
    model = lf.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapters = attach_adapters(model, folders)
    ids = torch.randint(1, 96, (3, 9), generator=torch.Generator().manual_seed(5))
    names = ["a1", None, "a0"]
    got = adapters.forward(ids, names)
    for i, n in enumerate(names):
        _close(got[i:i + 1], peft_logits(pm, ids[i:i + 1], n))


# ---- what is not served ------------------------------------------------------------------------
def _edit_config(folder, dest, **changes):
    import shutil
    shutil.copytree(folder, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg.update(changes)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes,match", [
    (dict(use_dora=True), "DoRA"), (dict(bias="all"), "trained base biases"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"), (dict(peft_type="IA3"), "only LoRA"),
])
def test_configs_that_are_not_served(llama, tmp_path, changes, match):
    folder = _edit_config(llama[2]["a0"], tmp_path / "edited", **changes)
    with pytest.raises(ConfigError, match=match):
        read_peft_adapter(folder)


def test_adapters_on_other_modules_are_errors_and_leave_the_model_alone(llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    hf, _, folders, load = llama
    m = get_peft_model(copy.deepcopy(hf), LoraConfig(r=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False))
    m.save_pretrained(tmp_path / "head", save_embedding_layers=False)
    model = load()
    with pytest.raises(ConfigError, match="lm_head is not a projection of a llama decoder layer"):
        attach_adapters(model, {"a0": folders["a0"], "head": tmp_path / "head"})
    assert not any(isinstance(x, LoRALinear) for x in model.modules()) and model.fused_decode


def test_a_rank_past_the_stores_is_an_error(llama):
    _, _, folders, load = llama
    adapters = attach_adapters(load(), {"a0": folders["a0"]}, slots=2)
    with pytest.raises(ConfigError, match="rank 64, past the stores' 8"):
        adapters.load("a3", folders["a3"])


def test_a_folder_without_safetensors(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin: save it with safe_serialization=True"):
        read_peft_adapter(tmp_path)
