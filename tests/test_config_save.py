"""Configs that build and train must also save and reload (transformers re-validates the config on save)."""
import pytest
import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM


@pytest.mark.parametrize("preset, overrides", [
    ("tiny", dict(num_attention_heads=3)),  # MLA: derived head_dim 64 // 3 = 21 is unused (RoPE is qk_rope_head_dim)
    ("tiny-deepseek-v4-flash", dict(head_dim=33, o_groups=3)),  # v4 rotates only its 16-d tail
])
def test_odd_unused_head_dim_saves_and_reloads(tmp_path, preset, overrides):
    model = SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()
    ids = torch.randint(3, model.config.vocab_size, (1, 12))
    model.save_pretrained(tmp_path)
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.num_attention_heads, loaded.config.head_dim) == (model.config.num_attention_heads,
                                                                         model.config.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_gqa_odd_rotary_width_still_rejected_at_construction():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        SeekV4Config.from_preset("tiny-gqa", num_attention_heads=3, num_key_value_heads=1)  # head_dim 21
