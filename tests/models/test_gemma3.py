"""Gemma 3's image-text checkpoints (Gemma3ForConditionalGeneration: the 4B, 12B and 27B models) through
lf.from_pretrained on the CPU: the language model of `text_config` (gemma3_text), its tensors under
`language_model.model.` (the vision tower and its projector left unread), gives transformers' logits for text
prompts and its greedy tokens."""
from __future__ import annotations

import pytest
import torch

import layerforge as lf
from layerforge.models.spec import ConfigError

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=5,
            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def test_gemma3_image_text_checkpoint_serves_its_language_model(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4)
    hf = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():   # norms away from their init values, so that loading them matters
        for n, p in hf.named_parameters():
            if p.dim() == 1 and "language_model" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours = lf.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.spec.model_type == "gemma3_text" and ours.spec.qk_norm and ours.spec.num_layers == 2
    ids = torch.randint(1, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(ours(ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    prompt = ids[:1, :7]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 7:].tolist()
    assert ours.generate(prompt, max_new_tokens=12)[0] == want
    # a tensor of neither the language model nor the parts left unread is still an error
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "model.safetensors"))
    save_file({**tensors, "audio_tower.w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match="unexpected tensor 'audio_tower.w'"):
        lf.from_pretrained(tmp_path, dtype=torch.float32)
