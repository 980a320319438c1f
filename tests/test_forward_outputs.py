"""What SeekV4Model / SeekV4ForCausalLM return: tuples (`return_dict`), hidden states, attentions, logits_to_keep."""
import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM


def make(preset="tiny", **overrides):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(SeekV4Config.from_preset(preset, **overrides)).eval()


def prompt(batch=2, length=12, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_entries(tup, ref):
    """`tup` holds `ref`'s non-None fields in order (ModelOutput.to_tuple), tensors (and tuples of them) equal."""
    expected = [v for v in ref.values() if v is not None]
    assert len(tup) == len(expected)
    for got, want in zip(tup, expected):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        elif isinstance(want, tuple):
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-6, rtol=0)
        else:
            assert type(got) is type(want)  # the cache: a fresh one per call


def test_causal_lm_return_dict_false_is_the_tuple_of_the_same_values():
    model, ids = make(aux_loss_alpha=0.01, num_nextn_predict_layers=1), prompt()
    model.train()  # the balance loss is a training term: every loss field is set
    model.config.attention_dropout = 0.0
    kw = dict(labels=ids, output_hidden_states=True, output_router_logits=True, use_cache=True)
    ref = model(ids, **kw)
    assert ref.mtp_loss is not None and ref.aux_loss is not None
    tup = model(ids, return_dict=False, **kw)
    assert isinstance(tup, tuple)
    assert_same_entries(tup, ref)
    model.config.return_dict = False  # the config's default, as transformers honours it
    assert_same_entries(model(ids, **kw), ref)
    assert not isinstance(model(ids, return_dict=True, **kw), tuple)


def test_base_model_return_dict_false_is_the_tuple_of_the_same_values():
    model, ids = make(), prompt()
    with torch.no_grad():
        ref = model.model(ids, output_hidden_states=True, output_router_logits=True)
        tup = model.model(ids, output_hidden_states=True, output_router_logits=True, return_dict=False)
    assert isinstance(tup, tuple)
    assert_same_entries(tup, ref)


def test_hidden_states_are_each_layers_input_then_the_final_normed_state():
    """Reference: forward hooks on the decoder layers, independent of the model's own collection."""
    model, ids = make(), prompt()
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out[0])

    hooks = [layer.register_forward_hook(record) for layer in model.model.layers]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for hook in hooks:
        hook.remove()
    n = model.config.num_hidden_layers
    assert len(out.hidden_states) == n + 1 and len(inputs) == n
    assert all(h.shape == (2, 12, 64) for h in out.hidden_states)  # plain: [B, S, H], not the [B, S, 1, H] stream
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids))  # an embedding lookup: exact
    for i in range(n - 1):
        torch.testing.assert_close(out.hidden_states[i + 1], outputs[i].squeeze(2))
        torch.testing.assert_close(out.hidden_states[i + 1], inputs[i + 1].squeeze(2))
    torch.testing.assert_close(out.hidden_states[-1], model.model.norm(model.model.hc_head(outputs[-1])))
    assert out.hidden_states[-1] is not None and model(ids).hidden_states is None


def test_hidden_states_of_hc_models_are_the_residual_streams():
    model, ids = make(residual_kind="mhc", hc_mult=4), prompt()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.hidden_states[0].shape == (2, 12, 4, 64)
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(ids)[:, :, None].expand(-1, -1, 4, -1))
    assert out.hidden_states[-1].shape == (2, 12, 64)  # after the residual head and the final norm


def test_output_hidden_states_selects_indices_as_transformers():
    model, ids = make(), prompt()
    with torch.no_grad():
        every = model(ids, output_hidden_states=True).hidden_states
        some = model(ids, output_hidden_states=[0, -1]).hidden_states
        one = model(ids, output_hidden_states=2).hidden_states
    assert len(some) == len(every) == len(one) == 5
    assert [h is None for h in some] == [False, True, True, True, False]
    assert [h is None for h in one] == [True, True, False, True, True]
    torch.testing.assert_close(some[0], every[0])
    torch.testing.assert_close(some[-1], every[-1])
    torch.testing.assert_close(one[2], every[2])


def test_output_flags_default_to_the_config():
    model, ids = make(output_hidden_states=True, output_attentions=True, output_router_logits=True), prompt()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids)
        off = model(ids, output_hidden_states=False, output_attentions=False, output_router_logits=False)
    assert len(out.hidden_states) == 5 and len(out.attentions) == 4 and len(out.router_logits) == 3
    assert off.hidden_states is None and off.attentions is None and off.router_logits is None


def test_attentions_are_causal_distributions_one_per_main_layer():
    """MTP blocks are decoder layers too, but only the main layers' attentions are returned."""
    model, ids = make(num_nextn_predict_layers=1), prompt()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, labels=ids, output_attentions=True)
    assert len(out.attentions) == model.config.num_hidden_layers
    for weights in out.attentions:
        assert weights.shape == (2, 4, 12, 12)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 12))
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))  # masked probabilities are exact zeros


@pytest.mark.parametrize("as_tensor", [False, True])
def test_logits_to_keep(as_tensor):
    model, ids = make(), prompt()
    with torch.no_grad():
        full = model(ids).logits
        keep = torch.tensor([0, 5, 11]) if as_tensor else 3
        kept = model(ids, logits_to_keep=keep).logits
        per_sample = model(ids, logits_to_keep=torch.tensor([[1, 4], [7, 9]])).logits  # [B, k] positions per row
    torch.testing.assert_close(kept, full[:, keep] if as_tensor else full[:, -3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_sample, torch.stack([full[0, [1, 4]], full[1, [7, 9]]]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [
    {"cu_seq_lens_q": torch.tensor([0, 5, 12]), "cu_seq_lens_k": torch.tensor([0, 5, 12])},
    {"seq_idx": torch.zeros(1, 12, dtype=torch.int32)},
    {"is_causal": False},
])
def test_packed_sequence_and_bidirectional_kwargs_are_refused(kwargs):
    """Ignoring them would let documents packed into one row attend to each other."""
    model, ids = make(), prompt(batch=1)
    with pytest.raises(ValueError, match="packed sequences|causal decoder"):
        model(ids, **kwargs)


def test_loss_kwargs_pass_the_base_model_and_cache_is_kept():
    """Trainer's loss kwargs reach the loss through the base model (which ignores them), as in Llama."""
    model, ids = make(), prompt()
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(2 * 11 * 2)).loss
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache)
    torch.testing.assert_close(summed, mean / 2)
    assert cache.get_seq_length() == 12
