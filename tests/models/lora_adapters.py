"""PEFT LoRA adapters of the tiny transformers models (tests/models/hf_tiny.py), saved with
save_pretrained: shared by the CPU tests (tests/models/test_lora_model.py) and the GPU tests."""
from __future__ import annotations

import copy

import torch

# the modules every adapter of a family targets (all of its decoder layers' projections)
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
RANKS = (8, 16, 32, 64)


def adapter_configs(name: str, ranks=RANKS) -> list[dict]:
    """LoraConfig arguments of adapters a0, a1, ...: the given ranks, different alphas; a1 with
    rsLoRA, a2 with an alpha_pattern, a3 with a rank_pattern (Llama-like families)."""
    out = []
    for i, r in enumerate(ranks):
        kw = dict(r=r, lora_alpha=r + 8 * i + 3, target_modules=TARGETS[name], init_lora_weights=False,
                  use_rslora=i == 1, fan_in_fan_out=name == "gpt2")
        if i == 2:
            kw["alpha_pattern"] = {TARGETS[name][-1]: 5.0}
        if i == 3 and "k_proj" in TARGETS[name]:
            kw["rank_pattern"] = {"k_proj": 4}
        out.append(kw)
    return out


def make_adapters(hf, name: str, folder, ranks=RANKS, *, seed: int = 0) -> dict[str, object]:
    """Save adapters a0.. of `hf` (a transformers model, left untouched) under folder/a0 ..;
    returns {adapter name: its folder}. B is drawn small, so that the adapted logits stay near
    the base model's scale."""
    from peft import LoraConfig, get_peft_model
    folders = {}
    for i, kw in enumerate(adapter_configs(name, ranks)):
        torch.manual_seed(seed + 100 + i)
        m = get_peft_model(copy.deepcopy(hf), LoraConfig(**kw))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.2)
        folders[f"a{i}"] = folder / f"a{i}"
        m.save_pretrained(folders[f"a{i}"])
    return folders


def peft_with(hf, folders: dict[str, object]):
    """A PeftModel over a copy of hf with every adapter of `folders` loaded (eval mode)."""
    from peft import PeftModel
    names = list(folders)
    pm = PeftModel.from_pretrained(copy.deepcopy(hf), folders[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(folders[n], adapter_name=n)
    return pm.eval()


def peft_logits(pm, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    """PEFT's logits of ids with one adapter alone (None: the base model)."""
    with torch.no_grad():
        if adapter is None:
            with pm.disable_adapter():
                return pm(ids).logits
        pm.set_adapter(adapter)
        return pm(ids).logits
