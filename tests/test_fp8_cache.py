"""FP8 (e4m3) latent cache: format, error, cache correctness, reporting."""
import math

import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.cli import main
from seekv4.modeling.fp8 import dequantize_fp8, pack_fp8, quantize_fp8, unpack_fp8


def test_scales_are_powers_of_two_and_values_fit_e4m3():
    x = torch.randn(3, 64) * torch.tensor([1e-3, 1.0, 300.0])[:, None]
    q, scales = quantize_fp8(x, 16)
    assert q.dtype == torch.float8_e4m3fn and scales.shape == (3, 4)
    assert torch.equal(torch.exp2(torch.log2(scales).round()), scales)
    assert (q.float().abs() <= 448).all()
    blocks = x.unflatten(-1, (4, 16)).abs().amax(-1)
    assert (blocks / scales <= 448).all() and (blocks / scales > 224).all()  # smallest power of two that fits
    rel = ((dequantize_fp8(q, scales, torch.float32) - x).abs() / x.abs().clamp_min(1e-30)).max()
    assert rel <= 2**-4 + 1e-6  # e4m3 keeps 3 mantissa bits: half-ulp relative error <= 1/16


def test_pack_unpack_round_trip():
    x = torch.randn(2, 1, 5, 32)
    packed = pack_fp8(x, 16)
    assert packed.shape == (2, 1, 5, 32 + 4 * 2) and packed.dtype == torch.float8_e4m3fn
    assert torch.equal(unpack_fp8(packed, 32, torch.float32), dequantize_fp8(*quantize_fp8(x, 16), torch.float32))


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek-v3.2"])
def test_fp8_cache_is_stored_as_fp8_and_decoding_matches_full_forward(preset, assert_same_greedy):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset(preset, kv_cache_dtype="fp8_e4m3",
                                                       kv_cache_fp8_block=16)).eval()
    ids = torch.randint(3, 256, (2, 30))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :20], past_key_values=cache).logits]
        steps += [model(ids[:, t: t + 1], past_key_values=cache).logits for t in range(20, 30)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    record = cache.layers[0].keys
    assert record.dtype == torch.float8_e4m3fn and record.shape == (2, 1, 30, 32 + 8 + 4 * 8)  # latent|scales|rope
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)  # top-2 margins here go down to ~4e-5
    assert_same_greedy(model, model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_info_reports_flashmla_bytes_and_measured_error(capsys):
    assert main(["info", "deepseek-v3", "--kv-cache-dtype", "fp8_e4m3"]) == 0
    out = capsys.readouterr().out
    assert "mla: 656 bytes per token per layer" in out  # FlashMLA's V3.2 record: 512 e4m3 + 4 fp32 scales + 64 bf16
    error = float(out.split("round-trip error ")[1].split("%")[0]) / 100
    assert 0.005 < error < 2**-4 / math.sqrt(3)  # uniform rounding error of a 3-bit mantissa, RMS


def test_info_reports_v4_fp8_record_bytes(capsys):
    assert main(["info", "deepseek-v4-flash", "--kv-cache-dtype", "fp8_e4m3"]) == 0
    out = capsys.readouterr().out
    # per entry: 512 - 64 = 448 non-RoPE dims in e4m3, 448 / 64 = 7 float32 scales, 64 RoPE dims in bf16
    assert "604 bytes per entry" in out
    cfg = SeekV4Config.from_preset("deepseek-v4-flash")
    csa, hca = cfg.attention_sparsity.count("csa"), cfg.attention_sparsity.count("hca")
    expect = csa * (604 + 2 * 128) / 4 + hca * 604 / 128  # CSA also stores one bf16 index key per entry
    assert f"fp8_e4m3: {expect:,.1f} bytes per token" in out


@pytest.mark.parametrize("overrides, field", [
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype"),
    (dict(kv_cache_dtype="fp8_e4m3", kv_cache_fp8_block=24), "kv_cache_fp8_block"),
])
def test_invalid_fp8_settings(overrides, field):
    with pytest.raises(ValueError, match=rf"SeekV4Config\.{field}.*invalid"):
        SeekV4Config.from_preset("tiny", **overrides)


def test_fp8_cache_rejected_for_gqa():
    with pytest.raises(ValueError, match="'mla' and 'v4' attention only"):
        SeekV4Config.from_preset("tiny-gqa", kv_cache_dtype="fp8_e4m3")
