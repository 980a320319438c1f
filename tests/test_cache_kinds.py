"""Every cache kind (dynamic, static, offloaded) decodes as the cache-less model (1e-4); positions from the mask.

The reference is `generate(use_cache=False)`: each step re-runs the whole sequence, so no cache state is involved.
With prompt lengths 5 and 11 a static buffer (prompt + 8 slots) is long enough for the MLA layer to take its absorbed
path at prefill, which applies its own causal mask when given none; 1 and 16 do not, DSA layers fail at any length.
"""
import pytest
import torch
from transformers import DynamicCache, StaticCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM

NEW_TOKENS = 8
LENGTHS = [1, 5, 11, 16]
CACHES = ["dynamic", "static", "offloaded"]
_GQA_DSA = dict(attention_sparsity=["dsa"] * 4, index_n_heads=4, index_head_dim=16, index_rope_head_dim=8,
                index_topk=4)
# (preset, overrides): dense MLA and GQA, MLA+DSA with a top-k well below the context, GQA+DSA, the MLA-based seed
CONFIGS = {
    "mla": ("tiny", {}),
    "gqa": ("tiny-gqa", {}),
    "mla-dsa-top1": ("tiny-deepseek-v3.2", dict(index_topk=1)),
    "mla-dsa-top4": ("tiny-deepseek-v3.2", dict(index_topk=4)),
    "gqa-dsa-top4": ("tiny-gqa", _GQA_DSA),
    "seed-v4": ("tiny-seed-v4", dict(index_topk=4)),
}
V4_PRESETS = ["tiny-deepseek-v4-flash", "tiny-deepseek-v4.1-flash"]  # the latter with Engram
_MODELS = {}


def make(preset, **overrides):
    key = (preset, repr(sorted(overrides.items())))
    if key not in _MODELS:
        torch.manual_seed(0)
        _MODELS[key] = SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()
    return _MODELS[key]


def ids_of(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, **kw):
    """Tokens [B, S + N] and raw next-token logits [B, N, V] (before any logits processor)."""
    out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.logits, dim=1)


class _HostStream:
    """Stands in for the CUDA streams an offloading cache synchronises on (CPU work is already in order)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, other):
        pass


def emulate_offloading(monkeypatch):
    """Without an accelerator, let offloading run on the CPU with "offloaded" tensors that cannot be read: the
    offload copy (`.to("cpu", non_blocking=True)`) returns a data-less meta tensor and the prefetch copy back
    returns the original. A layer read while offloaded, i.e. without its prefetch, fails on the meta tensor."""
    offloaded, to = {}, torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        if args[:1] == ("cpu",) and kwargs.get("non_blocking"):
            if self.is_meta:
                return self
            stub = torch.empty_like(self, device="meta")
            offloaded[id(stub)] = (stub, self)
            return stub
        if self.is_meta and id(self) in offloaded:
            return offloaded.pop(id(self))[1]
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(torch, "Stream", _HostStream)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: _HostStream())


@pytest.fixture
def device_for(monkeypatch):
    """cache kind -> device to run on: offloaded kinds on CUDA when there is one, else emulated on the CPU."""
    def pick(cache):
        if not cache.startswith("offloaded"):
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        emulate_offloading(monkeypatch)
        return "cpu"
    return pick


def assert_same_decode(model, ids, cache, device="cpu", **kw):
    reference = greedy(model.cpu(), ids, use_cache=False, **kw)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    tokens, logits = greedy(model.to(device), ids.to(device), cache_implementation=cache, **kw)
    model.cpu()
    torch.testing.assert_close(logits.cpu(), reference[1], atol=1e-4, rtol=0)
    assert torch.equal(tokens.cpu(), reference[0])


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", CONFIGS)
def test_cached_greedy_decode_equals_no_cache(name, length, cache, device_for):
    preset, overrides = CONFIGS[name]
    assert_same_decode(make(preset, **overrides), ids_of(1, length, seed=length), cache, device_for(cache))


@pytest.mark.parametrize("cache", ["dynamic", "offloaded"])
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("preset", V4_PRESETS)
def test_v4_cached_greedy_decode_equals_no_cache(preset, length, cache, device_for):
    assert_same_decode(make(preset), ids_of(1, length, seed=length), cache, device_for(cache))


@pytest.mark.parametrize("name", ["mla", "gqa"])
def test_fp8_quantized_cache_stays_within_fp8_rounding(name):
    """transformers' FP8 `quantized` cache is lossy by design (e4m3 keys/values, one scale per tensor): the prefill
    step is exact, later steps stay within FP8 rounding (a misplaced position or an unmasked slot moves logits by
    0.4 and more here)."""
    preset, overrides = CONFIGS[name]
    model, ids = make(preset, **overrides), ids_of(1, 11, seed=11)
    tokens_ref, reference = greedy(model, ids, use_cache=False)
    tokens, logits = greedy(model, ids, cache_implementation="quantized", cache_config={"backend": "fp8"})
    torch.testing.assert_close(logits[:, 0], reference[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, reference, atol=2e-2, rtol=0)
    assert torch.equal(tokens, tokens_ref)


@pytest.mark.parametrize("cache", ["static", "offloaded_static"])
@pytest.mark.parametrize("preset", V4_PRESETS)
def test_v4_static_cache_is_refused_naming_the_kind_and_the_fix(preset, cache):
    model, ids = make(preset), ids_of(1, 5, seed=5)
    with pytest.raises(ValueError, match=r"(?s)static.*`v4`.*dynamic cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation=cache)
    with pytest.raises(ValueError, match=r"(?s)static.*`v4`.*dynamic cache"):
        StaticCache(config=model.config, max_cache_len=16)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("name", ["mla", "gqa", "mla-dsa-top4", "gqa-dsa-top4"])
def test_left_padded_batch_cached_decode_equals_no_cache(name, cache, device_for):
    preset, overrides = CONFIGS[name]
    ids = ids_of(2, 11, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0  # second row: 5 real tokens, left-padded
    assert_same_decode(make(preset, **overrides), ids, cache, device_for(cache), attention_mask=mask)


def test_v4_left_padded_batch_cached_decode_equals_no_cache():
    ids = ids_of(2, 11, seed=7)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    assert_same_decode(make("tiny-deepseek-v4-flash"), ids, "dynamic", attention_mask=mask)


def test_static_cache_forward_matches_full_forward_step_by_step():
    """Prefill then single-token steps into a StaticCache built by hand, against one cache-less forward."""
    model, ids = make("tiny-deepseek-v3.2", index_topk=1), ids_of(1, 12, seed=3)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=32)
        steps = [model(ids[:, :5], past_key_values=cache).logits]
        steps += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


POSITION_CONFIGS = {"mla": ("tiny", {}), "gqa": ("tiny-gqa", {}), "mla-dsa": ("tiny-deepseek-v3.2", {}),
                    "v4-flash": ("tiny-deepseek-v4-flash", {}), "v4-pro": ("tiny-deepseek-v4-pro", {})}


@pytest.mark.parametrize("name", POSITION_CONFIGS)
def test_left_padded_forward_without_position_ids_equals_each_row_alone(name):
    """Positions come from the mask (cumsum - 1, as generate derives them), so a left-padded row sees its real
    tokens at 0, 1, ...: V4's compressors pool windows of those positions and would otherwise be misaligned."""
    preset, overrides = POSITION_CONFIGS[name]
    model = make(preset, **overrides)
    long, short = ids_of(1, 70, seed=11)[0], ids_of(1, 37, seed=12)[0]  # past V4's window (32) and HCA block (32)
    batch = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    batch[0], mask[0] = long, 1
    batch[1, 33:], mask[1, 33:] = short, 1
    with torch.no_grad():
        together = model(batch, attention_mask=mask, use_cache=False).logits
        alone_long = model(long[None], use_cache=False).logits[0]
        alone_short = model(short[None], use_cache=False).logits[0]
    torch.testing.assert_close(together[0], alone_long, atol=1e-5, rtol=0)
    torch.testing.assert_close(together[1, 33:], alone_short, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mla", "v4-flash"])
def test_left_padded_decode_without_position_ids_equals_each_row_alone(name):
    """A hand-written decode loop passing only the growing 2-D mask (no position_ids) into a dynamic cache."""
    preset, overrides = POSITION_CONFIGS[name]
    model = make(preset, **overrides)
    short = ids_of(1, 9, seed=13)[0]
    batch = torch.cat((torch.zeros(1, 6, dtype=torch.long), short[None]), dim=1)
    mask = (batch != 0).long()
    mask[0, 6:] = 1
    nxt = ids_of(1, 4, seed=14)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        steps = [model(batch, attention_mask=mask, past_key_values=cache).logits[:, 6:]]
        for t in range(4):
            mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.long)), dim=1)
            steps.append(model(nxt[:, t: t + 1], attention_mask=mask, past_key_values=cache).logits)
        alone = model(torch.cat((short[None], nxt), dim=1), use_cache=False).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), alone, atol=1e-5, rtol=0)


def test_mask_longer_than_the_sequence_is_an_error():
    model, ids = make("tiny"), ids_of(1, 5, seed=1)
    mask = torch.ones(1, 7, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=mask)
