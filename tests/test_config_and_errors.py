"""Config presets/validation and clear errors for bad input."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import seekv4
from seekv4 import SeekV4Config, SeekV4ForCausalLM


def test_presets_listed_and_buildable():
    names = seekv4.list_presets()
    assert {"tiny", "tiny-gqa", "deepseek-v3"} <= set(names)
    v3 = SeekV4Config.from_preset("deepseek-v3")  # config only: never instantiated
    assert v3.ffn_types[:4] == ["dense", "dense", "dense", "moe"] and len(v3.attention_types) == 61
    tiny = SeekV4Config.from_preset("tiny", hidden_size=96)
    assert tiny.hidden_size == 96
    with pytest.raises(ValueError, match="Unknown preset 'nope'.*available presets"):
        SeekV4Config.from_preset("nope")


def test_default_schedules_follow_first_k_dense_replace():
    c = SeekV4Config(num_hidden_layers=4, first_k_dense_replace=2)
    assert c.attention_types == ["mla"] * 4 and c.ffn_types == ["dense", "dense", "moe", "moe"]


def test_config_json_roundtrip_and_base_loadable(tmp_path):
    from transformers import PreTrainedConfig

    c = SeekV4Config.from_preset("tiny")
    c.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" not in data and data["attention_types"] == c.attention_types
    assert SeekV4Config.from_pretrained(tmp_path).to_dict() == c.to_dict()
    PreTrainedConfig.from_json_file(tmp_path / "config.json")  # what Trainer resume does


@pytest.mark.parametrize("overrides, field", [
    (dict(attention_types=["mla", "dsa", "mla", "mla"]), "attention_types"),
    (dict(attention_types=["mla"] * 3), "attention_types"),
    (dict(ffn_types=["dense", "moe", "sparse", "moe"]), "ffn_types"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_attention_heads=-1), "num_attention_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(q_lora_rank=-3), "q_lora_rank"),
    (dict(rope_parameters={"rope_type": "ntk", "rope_theta": 1e4}), r"rope_parameters\['rope_type'\]"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), r"rope_parameters\['factor'\]"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"),
    (dict(swiglu_limit=0.0), "swiglu_limit"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}.*invalid"):
        SeekV4Config.from_preset("tiny", **overrides)


def test_invalid_gqa_heads():
    with pytest.raises(ValueError, match="num_key_value_heads.*divide"):
        SeekV4Config.from_preset("tiny-gqa", num_key_value_heads=3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset("tiny", max_position_embeddings=32)).eval()


def test_input_longer_than_max_positions(tiny):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        tiny(torch.ones(1, 33, dtype=torch.long))
    out = tiny(torch.ones(1, 30, dtype=torch.long))  # cache grows past the limit in the next call
    with pytest.raises(ValueError, match=r"30 cached \+ 3 new"):
        tiny(torch.ones(1, 3, dtype=torch.long), past_key_values=out.past_key_values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_wrong_input_ids_dtype(tiny, dtype):
    with pytest.raises(TypeError, match="input_ids.*integer token ids"):
        tiny(torch.ones(1, 4, dtype=dtype))


def test_out_of_vocab_ids_and_bad_shapes(tiny):
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        tiny(torch.tensor([[1, 256]]))
    with pytest.raises(ValueError, match=r"shape \[batch, seq_len\]"):
        tiny(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of"):
        tiny()


def test_hash_moe_needs_input_ids(tiny):
    with pytest.raises(ValueError, match="route by token id"):
        tiny(inputs_embeds=torch.randn(1, 4, 64))


def _saved(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_checkpoint_with_missing_keys(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    state = load_file(path)
    del state["model.layers.2.mlp.experts.down_proj"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.2.mlp.experts.down_proj'\].*strict=False"):
        SeekV4ForCausalLM.from_pretrained(tmp_path)
    model = SeekV4ForCausalLM.from_pretrained(tmp_path, strict=False)  # explicit opt-in re-initialises
    assert model.model.layers[2].mlp.experts.down_proj.abs().sum() > 0


def test_checkpoint_with_unexpected_keys(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    state = load_file(path)
    state["model.layers.9.self_attn.o_proj.weight"] = torch.zeros(2, 2)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys \['model.layers.9.self_attn.o_proj.weight'\]"):
        SeekV4ForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_with_wrong_shapes(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    state = load_file(path)
    state["model.norm.weight"] = torch.ones(65)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError,
                       match=r"wrongly shaped keys \['model.norm.weight: checkpoint \(65,\) vs model \(64,\)'\]"):
        SeekV4ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("overrides, field", [
    (dict(index_topk=4096, max_position_embeddings=2048), "index_topk"),  # top-k larger than any context
    (dict(index_rope_head_dim=7), "index_rope_head_dim"),
    (dict(index_rope_head_dim=64, index_head_dim=16), "index_rope_head_dim"),
    (dict(index_n_heads=0), "index_n_heads"),
    (dict(dsa_mode="warmup"), "dsa_mode"),
    (dict(indexer_loss_weight=-1.0), "indexer_loss_weight"),
    (dict(indexer_implementation="triton"), "indexer_implementation"),
])
def test_invalid_dsa_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}.*invalid"):
        SeekV4Config.from_preset("tiny-deepseek-v3.2", **overrides)


@pytest.mark.parametrize("field, value, expected", [
    ("routed_scaling_factor", "2.5", "float"),
    ("aux_loss_alpha", "0.1", "float"),
    ("rms_norm_eps", None, "float"),
    ("num_hidden_layers", 4.0, "int"),
    ("hc_mult", 4.0, r"int \| None"),
    ("use_cache", "yes", "bool"),
    ("tie_word_embeddings", 1, "bool"),
    ("hidden_act", 3, "str"),
    ("attention_types", "mla", r"list\[str\] \| None"),
    ("ffn_types", ["dense", 1, "moe", "moe"], r"list\[str\] \| None"),
    ("engram_vocab_size", "4096", r"int \| list\[int\]"),
    ("rope_parameters", [10000.0], r"dict \| None"),
])
def test_wrong_field_type_names_field_value_and_type(field, value, expected):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}={re.escape(repr(value))}.*expected {expected}, "
                                         rf"got {type(value).__name__}"):
        SeekV4Config.from_preset("tiny", **{field: value})


def test_wrong_field_type_in_config_json_is_refused(tmp_path):
    SeekV4Config.from_preset("tiny").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["routed_scaling_factor"] = "2.5"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"routed_scaling_factor='2\.5'.*expected float, got str"):
        SeekV4Config.from_pretrained(tmp_path)


def test_numbers_of_the_json_kinds_are_accepted():
    c = SeekV4Config.from_preset("tiny", routed_scaling_factor=2, attention_types=("mla",) * 4, eos_token_id=[1, 2])
    assert c.routed_scaling_factor == 2 and c.attention_types == ["mla"] * 4


def test_every_config_field_is_documented_in_the_docstring():
    """A field added without a line in SeekV4Config's docstring fails here (users read the docstring, not the code)."""
    import re

    doc = SeekV4Config.__doc__
    fields = [name for name in SeekV4Config.__annotations__ if name in SeekV4Config.__dict__
              and not name.startswith("_") and name not in ("model_type", "keys_to_ignore_at_inference",
                                                             "attribute_map")]
    assert len(fields) > 70
    missing = [f for f in fields if not re.search(rf"\b{f}\b", doc)]
    assert not missing, f"undocumented SeekV4Config fields: {missing}"
