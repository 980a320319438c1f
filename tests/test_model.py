"""Our own model: cache correctness, padding, save/load, Auto classes, training features."""
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import seekv4  # noqa: F401  (registers the Auto classes)
from seekv4 import SeekV4Config, SeekV4ForCausalLM, SeekV4Model

PRESETS = ["tiny", "tiny-gqa"]


def make(preset="tiny", **overrides):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()


def prompt(batch=2, length=16, vocab=256, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_with_cache_equals_without(preset, assert_same_greedy):
    model, ids = make(preset), prompt()
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert_same_greedy(model, model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("preset", PRESETS)
def test_incremental_decode_matches_full_forward(preset):
    model, ids = make(preset), prompt(length=24)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :10], past_key_values=cache).logits]  # prefill
        steps.append(model(ids[:, 10:13], past_key_values=cache).logits)  # a short chunk
        for t in range(13, 24):  # one token at a time (absorbed MLA decode path)
            steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_mla_absorbed_and_expanded_paths_agree():
    model, ids = make(), prompt(length=12)
    attn = model.model.layers[0].self_attn
    calls = []
    orig_abs, orig_exp = attn._absorbed, attn._expanded
    attn._absorbed = lambda *a, **k: calls.append("absorbed") or orig_abs(*a, **k)
    attn._expanded = lambda *a, **k: calls.append("expanded") or orig_exp(*a, **k)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :11], past_key_values=cache)
        step = model(ids[:, 11:], past_key_values=cache).logits
        full = model(ids, use_cache=False).logits[:, -1:]
    assert calls == ["expanded", "absorbed", "expanded"]
    assert (step - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_left_padded_batch_equals_each_sample_alone(preset):
    model = make(preset, pad_token_id=0)
    a, b = prompt(1, 14, seed=2)[0], prompt(1, 9, seed=3)[0]
    batch = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 5:], mask[1, 5:] = b, 1
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    alone_a = model.generate(a[None], **kw)
    alone_b = model.generate(b[None], **kw)
    assert torch.equal(together[0, 14:], alone_a[0, 14:])
    assert torch.equal(together[1, 14:], alone_b[0, 9:])


def test_beam_search_and_static_cache_run_and_agree_with_dynamic():
    model, ids = make(), prompt()
    kw = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, cache_implementation="static", **kw))
    beams = model.generate(ids, num_beams=3, num_return_sequences=2, **kw)
    assert beams.shape == (4, ids.shape[1] + 8)


def test_eager_and_sdpa_agree():
    sdpa, ids = make(), prompt()
    eager = make()
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        assert (sdpa(ids).logits - eager(ids).logits).abs().max().item() < 1e-5
        out = eager(ids, output_attentions=True)
    assert len(out.attentions) == 4 and out.attentions[0].shape == (2, 4, 16, 16)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_save_load_roundtrip_bit_exact(tmp_path, preset, shard):
    model = make(preset)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".safetensors") for f in files)
    if shard:
        assert "model.safetensors.index.json" in files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SeekV4ForCausalLM
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    ids = prompt()
    with torch.no_grad():  # weights are bit-exact (above); kernels may take another path on loaded tensors
        torch.testing.assert_close(model(ids).logits, loaded(ids).logits)
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is SeekV4Config and config.attention_types == model.config.attention_types
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is SeekV4Model


def test_tied_embeddings_roundtrip(tmp_path):
    model = make(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_gradient_checkpointing_gives_same_loss_and_grads():
    ids = prompt()
    ref = make().train()
    ref.config.attention_dropout = 0.0
    loss = ref(ids, labels=ids).loss
    loss.backward()
    ckpt = make().train()
    ckpt.activation_checkpointing_enable({"use_reentrant": False})
    loss2 = ckpt(ids, labels=ids).loss
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    for (n, p), (_, q) in zip(ref.named_parameters(), ckpt.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_resize_token_embeddings_keeps_function_and_extends_hash_table():
    model, ids = make(), prompt()
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == 300 and model.lm_head.weight.shape[0] == 300
    hash_router = model.model.layers[1].mlp.gate
    assert hash_router.tid2eid.shape[0] == 300
    with torch.no_grad():
        after = model(ids).logits
        assert torch.allclose(after[..., :256], before, atol=1e-6)
        model(torch.tensor([[299, 298, 257]]))  # new ids route and run


def test_router_logits_and_aux_loss_in_output():
    model, ids = make(aux_loss_alpha=0.01), prompt()
    model.train()
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 3  # three MoE layers in `tiny`
    assert out.router_logits[0].shape == (ids.numel(), 8)
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    out.loss.backward()
    assert model.model.layers[2].mlp.gate.weight.grad is not None
    model.eval()
    assert model(ids, labels=ids).aux_loss is None  # the balance loss is a training term


def test_return_dict_false_and_logits_to_keep():
    model, ids = make(), prompt()
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        tup = model(ids, return_dict=False)
    assert last.shape == (2, 1, 256) and torch.allclose(last, full[:, -1:], atol=1e-6)
    torch.testing.assert_close(tup[0], full)
