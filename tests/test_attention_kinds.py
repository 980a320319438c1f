"""Per-kind cache facts (modeling/attention_kinds.py) against hand-derived sizes, against the bytes a real cache
holds after a prefill, and the dense-mask flag against padded forwards."""
import re

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicIndexedLayer, DynamicLayer

from seekv4 import SeekV4Config
from seekv4.cli import main
from seekv4.configuration.configuration_seekv4 import CACHE_LAYER_TYPES, SPARSITY_KINDS
from seekv4.modeling import SeekV4ForCausalLM
from seekv4.modeling.attention_kinds import KINDS, attention_kind, attention_kinds
from seekv4.modeling.attention_v4 import V4CacheLayer
from seekv4.modeling.summary import kv_cache_bytes_per_token

ALL_KINDS = [("gqa", "dense"), ("gqa", "dsa"), ("mla", "dense"), ("mla", "dsa"),
             ("v4", "sliding"), ("v4", "csa"), ("v4", "hca")]
FP8_KINDS = ALL_KINDS[2:]  # gqa has no FP8 cache

# every size below is hand-derived from these fields
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, max_position_embeddings=256, num_attention_heads=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_key_value_heads=2, head_dim=16,  # gqa; v4's K=V head
    q_lora_rank=16, kv_lora_rank=32, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,  # mla (+ v4 RoPE dims)
    index_n_heads=2, index_head_dim=16, index_rope_head_dim=8, index_topk=16,  # dsa / csa indexer
    sliding_window=8, csa_compress_ratio=4, hca_compress_ratio=8, o_groups=2, o_lora_rank=16,  # v4
    kv_cache_fp8_block=8,
)

# elements per token per layer in the model dtype
ELEMENTS = {
    ("gqa", "dense"): 64,  # keys + values: 2 x 2 kv heads x 16
    ("gqa", "dsa"): 80,  # + a 16-dim index key
    ("mla", "dense"): 40,  # latent 32 + RoPE key 8
    ("mla", "dsa"): 56,  # + a 16-dim index key
    ("v4", "sliding"): 0,  # a fixed window
    ("v4", "csa"): 8.0,  # (16-dim entry + 16-dim index key) per 4 tokens
    ("v4", "hca"): 2.0,  # 16-dim entry per 8 tokens
}
# FP8 bytes per token per layer, by model dtype bytes. MLA record: 32 e4m3 + 4 float32 scales (32 / 8 blocks)
# + 8 RoPE dims in the model dtype; V4 entry: 8 e4m3 + 1 float32 scale + 8 RoPE dims; index keys in the model dtype
FP8_BYTES = {
    2: {("mla", "dense"): 64, ("mla", "dsa"): 96, ("v4", "sliding"): 0, ("v4", "csa"): 15.0, ("v4", "hca"): 3.5},
    4: {("mla", "dense"): 80, ("mla", "dsa"): 144, ("v4", "sliding"): 0, ("v4", "csa"): 27.0, ("v4", "hca"): 5.5},
}


def _config(kinds, **overrides):
    return SeekV4Config(**{**TINY, "num_hidden_layers": len(kinds), "ffn_types": ["dense"] * len(kinds),
                           "attention_types": [a for a, _ in kinds], "attention_sparsity": [s for _, s in kinds],
                           **overrides})


def _stored_bytes(layer) -> int:
    """Bytes a cache layer holds, read off its tensors (compressor stores only up to their used length)."""
    tensors = {}
    for name in ("keys", "values", "indexer_keys"):
        t = getattr(layer, name, None)
        if isinstance(t, torch.Tensor):
            tensors[id(t)] = t  # V4's keys and values are one tensor
    for state in getattr(layer, "states", {}).values():
        tensors[id(state.store)] = state.store[:, : state.length]
        tensors.update({id(t): t for t in (state.ring_kv, state.ring_gate, state.next_pos)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _measured_bytes_per_token(model, batch=2, lengths=(16, 32)) -> list[float]:
    """Per layer: growth of the stored bytes between prefills of two lengths, per token and sample. Both lengths
    are past the window and multiples of every compression ratio, so fixed state cancels and entries are whole."""
    sizes = []
    for n in lengths:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(3, 64, (batch, n)), past_key_values=cache)
        sizes.append([_stored_bytes(layer) for layer in cache.layers[: model.config.num_hidden_layers]])
    return [(b - a) / (lengths[1] - lengths[0]) / batch for a, b in zip(*sizes)]


def test_every_schedule_pair_has_one_kind_and_one_cache_layer_type():
    pairs = {(a, s) for a, sparsities in SPARSITY_KINDS.items() for s in sparsities}
    assert set(KINDS) == set(CACHE_LAYER_TYPES) == pairs == set(ALL_KINDS)


def test_elements_and_fp8_bytes_match_hand_derived_values():
    config = _config(ALL_KINDS)
    assert [k.cache_elements_per_token(config) for k in attention_kinds(config)] == [ELEMENTS[k] for k in ALL_KINDS]
    for dtype_bytes in (2, 4):
        assert kv_cache_bytes_per_token(config, dtype_bytes) == [ELEMENTS[k] * dtype_bytes for k in ALL_KINDS]
        fp8 = _config(FP8_KINDS, kv_cache_dtype="fp8_e4m3")
        assert kv_cache_bytes_per_token(fp8, dtype_bytes) == [FP8_BYTES[dtype_bytes][k] for k in FP8_KINDS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_e4m3"])
def test_bytes_per_token_match_what_a_prefilled_cache_stores(dtype, kv_cache_dtype):
    kinds = ALL_KINDS if kv_cache_dtype == "auto" else FP8_KINDS
    config = _config(kinds, kv_cache_dtype=kv_cache_dtype)
    model = SeekV4ForCausalLM(config).to(dtype).eval()
    measured = _measured_bytes_per_token(model)
    assert measured == kv_cache_bytes_per_token(config, dtype.itemsize)
    hand = [ELEMENTS[k] * dtype.itemsize for k in kinds] if kv_cache_dtype == "auto" else \
        [FP8_BYTES[dtype.itemsize][k] for k in kinds]
    assert measured == hand


def test_cache_layer_types_build_the_right_cache_layers():
    config = _config(ALL_KINDS)
    expected = {"full_attention": DynamicLayer, "indexed_attention": DynamicIndexedLayer, "seekv4_v4": V4CacheLayer}
    assert config.layer_types == [attention_kind(config, i).cache_layer_type for i in range(len(ALL_KINDS))]
    layers = DynamicCache(config=config).layers
    assert [type(layer) for layer in layers] == [expected[t] for t in config.layer_types]
    assert [type(layer) for layer in layers] == [DynamicLayer, DynamicIndexedLayer, DynamicLayer, DynamicIndexedLayer,
                                                 V4CacheLayer, V4CacheLayer, V4CacheLayer]


def test_an_invalid_pair_is_still_rejected_by_the_config_check():
    with pytest.raises(ValueError, match=r"attention_sparsity\[0\]='csa' is invalid"):
        _config([("mla", "csa")])


@pytest.mark.parametrize("kind, dsa_mode", [(k, "sparse") for k in ALL_KINDS] + [(("gqa", "dsa"), "dense_warmup"),
                                                                                 (("mla", "dsa"), "dense_warmup")])
def test_needs_dense_mask_is_exactly_what_padding_needs(kind, dsa_mode):
    """A left-padded sample must give the logits it gives alone. Kinds that claim no dense mask get none and are
    still right; kinds that claim one go wrong without it (so the claim is not just caution)."""
    config = _config([kind], dsa_mode=dsa_mode)
    needs = attention_kind(config, 0).needs_dense_mask(config)
    assert needs == (kind[1] == "dense" and kind[0] != "v4" or dsa_mode == "dense_warmup")
    model = SeekV4ForCausalLM(config).eval()
    assert model.model._needs_dense_mask == needs
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # sample 1: 4 padding slots (holding arbitrary tokens), then 8 real ones
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids[1:, 4:]).logits[0]
        padded = model(ids, attention_mask=mask, position_ids=positions).logits[1, 4:]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
        if needs:
            model.model._needs_dense_mask = False
            unmasked = model(ids, attention_mask=mask, position_ids=positions).logits[1, 4:]
            assert (unmasked - alone).abs().max() > 1e-3


def test_info_fp8_total_is_what_a_mixed_mla_v4_cache_stores(tmp_path, capsys):
    """The FP8 total of `seekv4 info` sums each layer's own record (it used to count an MLA record for every layer
    and add the index key to all MLA layers as soon as one was DSA)."""
    config = _config(FP8_KINDS, kv_cache_dtype="fp8_e4m3")
    config.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    reported = float(re.search(r"with kv_cache_dtype=fp8_e4m3: ([\d,.]+) bytes per token", out).group(1))
    measured = sum(_measured_bytes_per_token(SeekV4ForCausalLM(config).to(torch.bfloat16).eval()))
    assert reported == measured == 64 + 96 + 0 + 15 + 3.5
    assert "mla/dsa: 96 bytes per token per layer" in out and "v4/csa: 15.0 bytes per token per layer" in out


def test_info_with_an_fp8_cache_the_preset_cannot_hold_is_a_clear_error(capsys):
    assert main(["info", "tiny", "--kv-cache-dtype", "fp8_e4m3"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype fp8_e4m3 does not fit tiny" in err and "kv_cache_fp8_block=128 is invalid" in err


@pytest.mark.parametrize("window", [8, 160])
def test_v4_cache_keeps_the_configured_window(window):
    """transformers builds V4CacheLayer without arguments; it must still keep `sliding_window - 1` rows (not a
    default 128: too many for a small window, too few for a wide one, where decoding then lost keys)."""
    config = _config([("v4", "sliding")], sliding_window=window, max_position_embeddings=512)
    model = SeekV4ForCausalLM(config).eval()
    ids = torch.randint(3, 64, (1, window + 12))
    prefill = window + 8
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=config)
        steps = [model(ids[:, :prefill], past_key_values=cache).logits]
        steps += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(prefill, ids.shape[1])]
    assert cache.layers[0].keys.shape[2] == window - 1
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_selectors_own_no_parameters_and_follow_their_module():
    """Selectors (modeling/sparsity.py) hold references to the indexer / compressors registered on the attention
    module: checkpoint keys stay `self_attn.indexer.*` / `self_attn.compressor.*`, and a copied model's selectors use
    the copy's modules (else a deepcopy would silently select with the original's weights)."""
    import copy

    model = SeekV4ForCausalLM(_config(ALL_KINDS))
    keys = list(model.state_dict())
    assert not [k for k in keys if "selector" in k]
    for i, (_, sparsity) in enumerate(ALL_KINDS):
        prefix = f"model.layers.{i}.self_attn."
        assert any(k.startswith(prefix + "indexer.") for k in keys) == (sparsity in ("dsa", "csa"))
        assert any(k.startswith(prefix + "compressor.") for k in keys) == (sparsity in ("csa", "hca"))
    clone = copy.deepcopy(model)
    for attn in (layer.self_attn for layer in clone.model.layers):
        for name in ("indexer", "compressor"):
            if getattr(attn.selector, name, None) is not None:
                assert getattr(attn.selector, name) is getattr(attn, name)
