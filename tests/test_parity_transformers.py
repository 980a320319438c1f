"""Converted transformers models compute the same function (logits within 1e-4, same greedy tokens)."""
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, LlamaConfig, LlamaForCausalLM

from seekv4.convert import from_transformers

NEW_TOKENS = 32


def _llama(**kw):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **kw)
    return LlamaForCausalLM(cfg).eval()


def _deepseek_v3(q_lora_rank, rope=None, **kw):
    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=q_lora_rank,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
        routed_scaling_factor=2.5, rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0}, **kw)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random router biases, so selection-only bias handling is exercised
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def _ours(src):
    """The converted model with the float32 reference selection (the default "auto" may pick the bf16 kernel)."""
    ours = from_transformers(src)
    ours.config.indexer_implementation = "eager"
    return ours


def _check(src, vocab):
    ours = _ours(src)
    ids = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        a, b = src(ids).logits, ours(ids).logits
    assert (a - b).abs().max().item() < 1e-4
    gen_kw = dict(max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
    ga, gb = src.generate(ids, **gen_kw), ours.generate(ids, **gen_kw)
    assert ga.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(ga, gb)


def test_llama_parity():
    _check(_llama(), 128)


def test_llama_tied_partial_rotary_parity():
    src = _llama(tie_word_embeddings=True, attention_bias=True)
    _check(src, 128)
    ours = from_transformers(src)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v3_parity(q_lora_rank):
    _check(_deepseek_v3(q_lora_rank), 128)


def test_deepseek_v3_yarn_parity():
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7}
    _check(_deepseek_v3(24, rope), 128)


def test_unsupported_model_is_rejected():
    with pytest.raises(ValueError, match="supported model types"):
        from_transformers(torch.nn.Linear(2, 2))


# ---- DeepSeek-V3.2 (DSA) ------------------------------------------------------------------------

def _deepseek_v32(index_topk=6):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    cfg = DeepseekV32Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=24,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256,
        index_topk=index_topk, index_head_dim=16, index_n_heads=4, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = DeepseekV32ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def test_deepseek_v32_parity(port_topk_with_our_tie_rule):
    src = _deepseek_v32()
    ours = from_transformers(src)
    assert ours.config.attention_sparsity == ["dsa"] * 3 and ours.config.index_topk == 6
    _check(src, 128)


def test_deepseek_v32_selection_is_sparse_for_long_prompts(port_topk_with_our_tie_rule):
    """With 24 tokens and top-6 most queries see a strict subset: changing an unselected key changes nothing."""
    ours = _ours(_deepseek_v32())
    ids = torch.randint(0, 128, (1, 24))
    with torch.no_grad():
        out = ours(ids, output_attentions=True)
    for weights in out.attentions:  # dense [B, H, S, T] view of the sparse probabilities
        assert ((weights[0, :, 10:] > 0).sum(-1) <= 6).all()
        assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-5)
