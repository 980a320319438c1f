"""Every tiny preset builds, runs, generates with a cache, and round-trips its config; full-size ones only parse."""
import pytest
import torch

import seekv4
from seekv4 import SeekV4Config, SeekV4ForCausalLM

TINY = [name for name in seekv4.list_presets() if name.startswith("tiny")]
FULL = [name for name in seekv4.list_presets() if not name.startswith("tiny")]


def test_every_full_size_preset_has_a_tiny_sibling():
    assert {"deepseek-v3.2", "deepseek-v4-flash", "deepseek-v4-pro", "seed-v4"} <= set(FULL)
    for name in FULL:
        if name != "deepseek-v3":
            assert f"tiny-{name}" in TINY


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_runs_and_generates(name, tmp_path):
    torch.manual_seed(0)
    config = SeekV4Config.from_preset(name)
    model = SeekV4ForCausalLM(config).eval()
    ids = torch.randint(3, config.vocab_size, (2, 40))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    model.save_pretrained(tmp_path)
    assert SeekV4Config.from_pretrained(tmp_path).to_dict() == config.to_dict()
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path).eval()  # strict: every weight and buffer accounted for
    saved = model.state_dict()
    for name, tensor in loaded.state_dict().items():  # the round trip itself is bit-exact
        assert torch.equal(tensor, saved[name]), name
    with torch.no_grad():  # logits to a tolerance: kernels may take another path on tensors loaded from safetensors
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("name", FULL)
def test_full_size_preset_is_valid(name):
    config = SeekV4Config.from_preset(name)
    assert len(config.attention_types) == len(config.attention_sparsity) == config.num_hidden_layers
