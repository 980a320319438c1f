"""Edge shapes of V4 compressed attention and of FP8 cache records.

* Sequences shorter than a compression ratio (no compressed entry exists yet) train and decode.
* FP8 records whose fields start at offsets not aligned to the field's dtype (float32 scales after an odd
  number of e4m3 bytes, float64 RoPE dims after a 60-byte FP8 part) read back correctly, and shapes that
  cannot work are rejected at config time, naming the field.
"""
import re

import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.cli import main
from seekv4.modeling.fp8 import dequantize_fp8, pack_fp8, quantize_fp8, unpack_fp8

# a float64 model still runs some softmaxes (compressor gates, MLA attention, routers) in float32
TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 5e-2}


def _model(preset, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).to(dtype)


def _decode_matches_full_forward(model, ids, prompt, atol):
    """Prefill `prompt` tokens into a cache, decode the rest one by one; compare with the cache-less forward."""
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :prompt], past_key_values=cache).logits]
        steps += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=atol, rtol=0)
    return cache


# --- sequences shorter than the compression ratio -------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny-deepseek-v4-flash", "tiny-deepseek-v4-pro", "tiny-seed-v4"])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_training_on_sequences_shorter_than_the_compress_ratio(preset, length):
    """S < csa_compress_ratio (and < hca_compress_ratio): no compressed entry, so no indexer KL term, yet the
    forward and backward run, with the logits a causal model gives for the same prefix of a longer sequence."""
    model = _model(preset, indexer_loss_weight=0.5, num_nextn_predict_layers=1).train()
    assert length < model.config.csa_compress_ratio < model.config.hca_compress_ratio
    ids = torch.randint(3, 256, (2, 8))
    out = model(ids[:, :length], labels=ids[:, :length])
    longer = model(ids).logits[:, :length].detach()
    torch.testing.assert_close(out.logits.detach(), longer, atol=1e-5, rtol=0)
    if model.config.attention_types[0] == "v4":
        assert out.indexer_loss is None  # no entry was selected anywhere: no KL term, not a zero or a NaN
    if length == 1:  # no next token to predict: the LM loss averages over nothing (transformers' convention)
        assert out.mtp_loss == 0  # MTP depth 1 has no target either: an exact 0 that keeps the graph
        loss = out.logits.float().pow(2).mean()
    else:
        assert torch.isfinite(out.loss), (out.lm_loss, out.mtp_loss, out.indexer_loss)
        if length == 2:  # MTP depth 1 predicts t+2: no target at S=2, so an exact 0 rather than NaN
            assert out.mtp_loss == 0
        else:
            assert torch.isfinite(out.mtp_loss)
        loss = out.loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v4-flash", "tiny-deepseek-v4-pro", "tiny-seed-v4"])
@pytest.mark.parametrize("prompt", [1, 2, 3])
def test_cached_decoding_from_a_short_prompt_matches_full_forward(preset, prompt):
    model = _model(preset).eval()
    _decode_matches_full_forward(model, torch.randint(3, 256, (2, 12)), prompt, atol=1e-5)


def test_gather_rows_from_an_empty_key_set():
    from seekv4.modeling.sparse_attention import gather_rows

    idx = torch.full((2, 3, 4), -1)
    assert torch.equal(gather_rows(torch.randn(2, 0, 5), idx), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="no rows"):
        gather_rows(torch.randn(2, 0, 5), idx.clone().fill_(0))


# --- FP8 records at unaligned offsets --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1, 1), (2, 1, 3)])
def test_unpack_reads_scales_at_unaligned_offsets(dtype, lead):
    """6 e4m3 values then 3 float32 scales: the scales start at byte 6. A [1, 1, 1, 18] slice is 'contiguous',
    so `.contiguous()` alone keeps the unaligned offset."""
    x = torch.randn(*lead, 6, dtype=torch.float64).to(dtype)
    packed = pack_fp8(x, 2)
    assert packed.shape == (*lead, 6 + 4 * 3)
    expect = dequantize_fp8(*quantize_fp8(x, 2), dtype)
    assert torch.equal(unpack_fp8(packed, 6, dtype), expect)
    record = torch.cat((torch.zeros(*lead, 3, dtype=packed.dtype), packed), dim=-1)[..., 3:]  # offset 3 in storage
    assert torch.equal(unpack_fp8(record, 6, dtype), expect)


@pytest.mark.parametrize("dtype, prompt", [(torch.float64, 1), (torch.float64, 4), (torch.float64, 8),
                                           (torch.float32, 1), (torch.float32, 6), (torch.bfloat16, 4)])
def test_v4_fp8_cache_in_any_dtype_matches_full_forward(dtype, prompt):
    """Tiny V4 record: 48 e4m3 + 3 float32 scales = 60 bytes, then 16 RoPE dims in the model dtype (offset 60 is
    not a multiple of 8 for float64). 34 tokens complete CSA entries and the first HCA entry (ratio 32). The
    cache-less forward applies the same FP8 rounding."""
    model = _model("tiny-deepseek-v4-flash", dtype, kv_cache_dtype="fp8_e4m3").eval()
    ids = torch.randint(3, 256, (1, 34))
    cache = _decode_matches_full_forward(model, ids, prompt, atol=TOL[dtype])
    csa = model.config.attention_sparsity.index("csa")
    store = cache.layers[csa].states["kv"].store
    assert store.dtype == torch.uint8 and store.shape[-1] == 48 + 4 * 3 + 16 * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch, prompt", [(1, 1), (1, 4), (2, 1)])
def test_mla_fp8_cache_with_odd_latent_offsets_matches_full_forward(dtype, batch, prompt):
    """kv_lora_rank=6, block 2: the float32 scales start at byte 6 and the RoPE key at byte 18 of each record."""
    model = _model("tiny", dtype, kv_cache_dtype="fp8_e4m3", kv_lora_rank=6, kv_cache_fp8_block=2).eval()
    ids = torch.randint(3, 256, (batch, 10))
    cache = _decode_matches_full_forward(model, ids, prompt, atol=TOL[dtype])
    record = cache.layers[0].keys
    assert record.dtype == torch.float8_e4m3fn and record.shape[-1] == 6 + 4 * 3 + 8 * dtype.itemsize


@pytest.mark.parametrize("preset, overrides, field", [
    ("tiny-deepseek-v4-flash", dict(qk_rope_head_dim=64), "qk_rope_head_dim"),  # nothing left to store in FP8
    ("tiny-deepseek-v4-flash", dict(kv_cache_fp8_block=32), "kv_cache_fp8_block"),  # 48 non-RoPE dims
    ("tiny", dict(kv_lora_rank=6, kv_cache_fp8_block=4), "kv_cache_fp8_block"),
])
def test_fp8_shapes_that_cannot_work_are_rejected_naming_the_field(preset, overrides, field):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}=.*invalid"):
        SeekV4Config.from_preset(preset, kv_cache_dtype="fp8_e4m3", **overrides)


def test_info_record_bytes_match_the_stored_v4_record(capsys):
    """`seekv4 info` reports the bytes per entry a bf16 model's cache really stores."""
    assert main(["info", "tiny-deepseek-v4-flash", "--kv-cache-dtype", "fp8_e4m3"]) == 0
    reported = int(re.search(r"\((\d+) bytes per entry", capsys.readouterr().out).group(1))
    model = _model("tiny-deepseek-v4-flash", torch.bfloat16, kv_cache_dtype="fp8_e4m3").eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 8)), past_key_values=cache)
    assert cache.layers[model.config.attention_sparsity.index("hca")].states["kv"].store.shape[-1] == reported
