"""Every use of a module's parameters goes through the module (or modeling/linear_weight.py, which calls it), so
PEFT LoRA layers, bitsandbytes 4-bit layers and accelerate offload hooks apply everywhere, not only where a
sublayer happens to call its projections the usual way (MLA's absorbed / DSA-sparse paths read `kv_b_proj`, V4's
grouped output reads `o_a_proj`, mHC sites compute their coefficients outside `forward`)."""
import pytest
import torch
from torch import nn

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling.attention_mla import MLAAttention
from seekv4.modeling.linear_weight import effective_weight, grouped_linear, plain_linear

ALL_TINY = ["tiny", "tiny-deepseek-v3.2", "tiny-deepseek-v4-flash", "tiny-deepseek-v4-pro", "tiny-deepseek-v4.1-flash",
            "tiny-gqa", "tiny-seed-v4"]
# one per attention path that multiplies by a weight in another shape: MLA absorbed (forced), MLA DSA-sparse, V4
LORA_PRESETS = ["tiny", "tiny-deepseek-v3.2", "tiny-deepseek-v4-flash", "tiny-gqa"]


def make(preset, **overrides):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()


def prompt(config, length=12, batch=2):
    return torch.randint(3, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def mla_absorbed(monkeypatch):
    """Outside training MLA takes its absorbed path (W_UK folded into the query, W_UV after attention) for every
    call, so prefill and decode both exercise the weight-reading path, whatever the cost model would pick."""
    monkeypatch.setattr(MLAAttention, "_use_absorbed", lambda self, *args: not self.training)


def greedy_with_cache(model, ids, steps=4):
    """Greedy tokens and each step's logits, decoding with the cache (prefill, then one token per call)."""
    out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, use_cache=True)
    return out.sequences, torch.stack(out.logits, dim=1)


# ----------------------------------------------------------------------------------------------------- PEFT LoRA
peft = pytest.importorskip("peft")


def with_lora(model, targets):
    """LoRA with random A and B (`init_lora_weights=False`), so the adapter changes every targeted layer."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def lora_targets(model, names):
    return [m for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer) and n.split(".")[-1] in names]


@pytest.mark.parametrize("preset,targets", [pytest.param(p, "all-linear", id=f"{p}-all-linear") for p in LORA_PRESETS]
                         + [pytest.param("tiny", ["kv_b_proj"], id="tiny-kv_b_proj"),
                            pytest.param("tiny-deepseek-v3.2", ["kv_b_proj"], id="tiny-deepseek-v3.2-kv_b_proj"),
                            pytest.param("tiny-deepseek-v4-flash", ["o_a_proj"], id="tiny-deepseek-v4-flash-o_a_proj")])
def test_unmerged_lora_equals_merged_model(preset, targets, mla_absorbed):
    """Unmerged LoRA gives the merged model's logits on a full forward and when decoding with the cache."""
    model = make(preset)
    # merged and unmerged layers agree to float rounding only; the fused kernel's bf16 scores would turn that into
    # different top-k picks at near-ties, so selection uses the float32 reference here
    model.config.indexer_implementation = "eager"
    ids = prompt(model.config, length=40)  # V4 prefill: enough rows for o_a_proj's effective-weight branch
    lora = with_lora(model, targets).eval()
    with torch.no_grad():
        full = lora(input_ids=ids, use_cache=False).logits
        sequences, step_logits = greedy_with_cache(lora, ids)
        merged = lora.merge_and_unload()
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
        ref = merged(sequences, use_cache=False).logits
    torch.testing.assert_close(full, ref[:, : ids.shape[1]], atol=2e-5, rtol=1e-4)
    # step t's logits predict token t + 1: compare with the merged model's no-cache logits at that position
    torch.testing.assert_close(step_logits, ref[:, ids.shape[1] - 1 : -1], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("preset,overrides", [
    pytest.param("tiny-deepseek-v3.2", {}, id="dsa-sparse"),  # absorbed MQA over the selected entries
    pytest.param("tiny-deepseek-v3.2", {"dsa_mode": "dense_warmup"}, id="dsa-dense-warmup"),  # absorbed attention
    pytest.param("tiny-deepseek-v4-flash", {}, id="v4"),
])
def test_lora_on_weight_reading_modules_gets_gradients(preset, overrides):
    """LoRA on kv_b_proj / o_a_proj trains: every adapter matrix of every layer gets a non-zero gradient."""
    model = make(preset, **overrides)
    lora = with_lora(model, ["kv_b_proj", "o_a_proj"]).train()
    ids = prompt(model.config)
    lora(input_ids=ids, labels=ids).loss.backward()
    layers = lora_targets(lora, ["kv_b_proj", "o_a_proj"])
    assert len(layers) == model.config.num_hidden_layers
    for layer in layers:
        for adapter in (layer.lora_A["default"], layer.lora_B["default"]):
            assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0


def test_effective_weight_of_a_lora_layer_is_the_merged_weight():
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(6, 10, bias=True))
    lora = peft.get_peft_model(holder, peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = lora.base_model.model[0]
    like = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        expected = layer.base_layer.weight.double() + layer.scaling["default"] * b @ a  # float64 reference
        layer.double()
        got = effective_weight(layer, like)
    assert not plain_linear(layer)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tokens, via_weight", [(1, False), (40, True)])
def test_grouped_linear_of_a_wrapped_layer_uses_the_diagonal_blocks(tokens, via_weight, monkeypatch):
    """Few rows: call the layer on x and keep the diagonal blocks; many: go through its effective weight. Both
    branches are asserted to run, against every group through every block in float64."""
    import seekv4.modeling.linear_weight as linear_weight

    torch.manual_seed(0)
    g, n, r = 4, 32, 3  # 1 token: 1·g·g = 16 < n + g = 36 (diagonal); 40 tokens: 640 > 192 (effective weight)
    holder = nn.Sequential(nn.Linear(n, g * r, bias=True))
    lora = peft.get_peft_model(holder, peft.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    layer = lora.base_model.model[0].double()
    x = torch.randn(1, tokens, g, n, dtype=torch.float64)
    calls = []
    affine = linear_weight._affine_parts
    monkeypatch.setattr(linear_weight, "_affine_parts", lambda *a: calls.append(1) or affine(*a))
    with torch.no_grad():
        per_group = layer(x).view(1, tokens, g, g, r)  # every group through every block
        expected = torch.stack([per_group[:, :, k, k] for k in range(g)], dim=2)
        got = grouped_linear(layer, x)
    assert bool(calls) == via_weight
    torch.testing.assert_close(got, expected)


def test_plain_linear_detects_wrappers_and_hooks():
    layer = nn.Linear(4, 4)
    assert plain_linear(layer)
    handle = layer.register_forward_pre_hook(lambda module, args: None)
    assert not plain_linear(layer)
    handle.remove()
    from accelerate.hooks import ModelHook, add_hook_to_module

    add_hook_to_module(layer, ModelHook())
    assert not plain_linear(layer)


# ------------------------------------------------------------------------------------------ bitsandbytes 4-bit
def quantised_pair(preset, tmp_path, **overrides):
    """(4-bit model loaded with transformers' BitsAndBytesConfig, float model holding its dequantised weights)."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    make(preset, **overrides).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    q = SeekV4ForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu").eval()
    ref = SeekV4ForCausalLM.from_pretrained(tmp_path).eval()
    quantised = {n: m for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for module in quantised.values():  # on AVX512-BF16 CPUs bnb repacks for a kernel that needs out % 32 == 0
        module.support_avx512bf16_for_cpu = False
    names = {n.split(".")[-1] for n in quantised}
    assert {"kv_b_proj", "o_a_proj"} & names, "the weight-reading projections must be among the 4-bit layers"
    with torch.no_grad():
        for name, module in quantised.items():
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            ref.get_submodule(name).weight.copy_(w)
    return q, ref


@pytest.mark.parametrize("preset", ["tiny", "tiny-deepseek-v3.2", "tiny-deepseek-v4-flash"])
def test_4bit_model_matches_its_dequantised_weights(preset, tmp_path, mla_absorbed):
    q, ref = quantised_pair(preset, tmp_path)
    ids = prompt(q.config)
    with torch.no_grad():
        sequences, step_logits = greedy_with_cache(q, ids)
        full = ref(sequences, use_cache=False).logits
        torch.testing.assert_close(q(sequences, use_cache=False).logits, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 : -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v3.2", "tiny-deepseek-v4-flash"])
def test_qlora_trains_adapters_on_4bit_weight_reading_modules(preset, tmp_path):
    q, _ = quantised_pair(preset, tmp_path)
    lora = with_lora(q, ["kv_b_proj", "o_a_proj"]).train()
    ids = prompt(q.config)
    lora(input_ids=ids, labels=ids).loss.backward()
    layers = lora_targets(lora, ["kv_b_proj", "o_a_proj"])
    assert len(layers) == q.config.num_hidden_layers
    for layer in layers:
        assert layer.lora_B["default"].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------- accelerate offloading
@pytest.mark.parametrize("preset,overrides", [pytest.param(p, {}, id=p) for p in ALL_TINY]
                         + [pytest.param("tiny", {"residual_kind": "hc"}, id="tiny-hc")])
def test_every_parameter_use_goes_through_forward(preset, overrides, mla_absorbed):
    """accelerate's `cpu_offload` keeps every parameter on the meta device except inside its own module's
    `forward`: a forward and a cached decode that read any parameter elsewhere fail or differ."""
    from accelerate import cpu_offload

    model = make(preset, **overrides)
    ids = prompt(model.config)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        sequences, step_logits = greedy_with_cache(model, ids)
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert model.lm_head.weight.is_meta
        torch.testing.assert_close(model(ids, use_cache=False).logits, full, atol=1e-5, rtol=1e-5)
        offloaded_sequences, offloaded_logits = greedy_with_cache(model, ids)
    assert torch.equal(offloaded_sequences, sequences)
    torch.testing.assert_close(offloaded_logits, step_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v4-flash", "tiny-deepseek-v4.1-flash", "tiny"])
def test_disk_offloaded_model_matches_in_memory(preset, tmp_path, mla_absorbed):
    """`from_pretrained(device_map=...)` with some decoder layers and the mHC head on disk."""
    model = make(preset)
    model.save_pretrained(tmp_path / "model")
    device_map = {"lm_head": "cpu"}
    for name, _ in model.model.named_children():  # odd layers and the residual head (mHC: HyperHead) on disk
        if name == "layers":
            device_map.update({f"model.layers.{i}": "disk" if i % 2 else "cpu"
                               for i in range(model.config.num_hidden_layers)})
        else:
            device_map[f"model.{name}"] = "disk" if name == "hc_head" else "cpu"
    offloaded = SeekV4ForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map,
                                                  offload_folder=tmp_path / "offload").eval()
    assert offloaded.model.layers[1].mlp.state_dict() and any(
        p.is_meta for p in offloaded.model.layers[1].parameters()), "layer 1 should live on disk"
    ids = prompt(model.config)
    with torch.no_grad():
        sequences, step_logits = greedy_with_cache(model, ids)
        full = model(sequences, use_cache=False).logits
        torch.testing.assert_close(offloaded(sequences, use_cache=False).logits, full, atol=1e-5, rtol=1e-5)
        offloaded_sequences, offloaded_logits = greedy_with_cache(offloaded, ids)
    assert torch.equal(offloaded_sequences, sequences)
    torch.testing.assert_close(offloaded_logits, step_logits, atol=1e-5, rtol=1e-5)
