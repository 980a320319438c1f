"""Amortised cache appends: decoding no longer copies the whole cache per token, and results are unchanged."""
import pytest
import torch
from transformers import DynamicCache

import seekv4.modeling.cache_append as cache_append
from seekv4 import SeekV4Config, SeekV4ForCausalLM


def _decode(model, ids, prefill=20):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(ids[:, :prefill], past_key_values=cache).logits]
        ptrs = []
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t: t + 1], past_key_values=cache).logits)
            ptrs.append(cache.layers[0].keys.data_ptr())
    return torch.cat(logits, 1), cache, ptrs


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("tiny-deepseek-v3.2", {}), ("tiny-gqa", {}),
                                               ("tiny", {"kv_cache_dtype": "fp8_e4m3", "kv_cache_fp8_block": 16})])
def test_appends_reuse_one_buffer_and_match_concatenation(preset, overrides, monkeypatch):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ours, cache, ptrs = _decode(model, ids)
    assert len(set(ptrs)) == 1  # 20 decode steps, one buffer: nothing was copied
    layer = cache.layers[0]
    assert layer.keys.shape[-2] == 40 and layer._append_buf_keys.shape[-2] == 20 + 256  # prefill + minimum slack
    if hasattr(layer, "indexer_keys") and layer.indexer_keys is not None:
        assert layer.indexer_keys.shape[1] == 40 and layer._append_buf_indexer_keys.shape[1] > 40
    monkeypatch.setattr(cache_append, "_handled", lambda *a: False)  # transformers' torch.cat path
    ref, ref_cache, _ = _decode(model, ids)
    torch.testing.assert_close(ours, ref)  # attention reads a strided buffer view here, a fresh tensor there
    bits = lambda t: t.view(torch.uint8) if t.element_size() == 1 else t  # noqa: E731  (fp8 records hold scale bytes)
    # layer 0's keys are projections of the same embeddings, so bit-exact; deeper layers see attention outputs
    assert torch.equal(bits(cache.layers[0].keys), bits(ref_cache.layers[0].keys))


def test_crop_reorder_and_select_then_append_match_concatenation(monkeypatch):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset("tiny-deepseek-v3.2")).eval()
    ids = torch.randint(3, 256, (2, 30), generator=torch.Generator().manual_seed(1))

    def run():
        cache = DynamicCache(config=model.config)
        out = []
        with torch.no_grad():
            model(ids[:, :20], past_key_values=cache)
            cache.crop(-4)  # a prefix view of the same buffer: later appends overwrite the dropped rows
            out.append(model(ids[:, 16:22], past_key_values=cache).logits)
            cache.reorder_cache(torch.tensor([1, 0]))  # replaced tensors: adopted into a new buffer
            out.append(model(ids[[1, 0], 22:25], past_key_values=cache).logits)
            cache.batch_select_indices(torch.tensor([1]))
            out.append(model(ids[:1, 25:30], past_key_values=cache).logits)
        return out, cache

    ours, cache = run()
    monkeypatch.setattr(cache_append, "_handled", lambda *a: False)
    ref, ref_cache = run()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.indexer_keys, b.indexer_keys)
