"""DeepSeek-V4: converted transformers port == seekv4 (sliding, CSA, HCA layers; hash and score MoE; mHC)."""
import torch
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from seekv4.convert import from_transformers

NEW_TOKENS = 32


def _deepseek_v4():
    cfg = DeepseekV4Config(
        vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=32, qk_rope_head_dim=8,
        q_lora_rank=24, o_groups=2, o_lora_rank=16, sliding_window=8, index_n_heads=2, index_head_dim=16,
        index_topk=3, n_routed_experts=8, num_experts_per_tok=2, intermediate_size=32, moe_intermediate_size=32,
        hc_mult=2, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                     "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"], max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1},
        compress_rope_theta=160000.0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    with torch.no_grad():  # a random hash table, router biases, sinks and compressor biases
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                gate.tid2eid.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(128)]))
            else:
                gate.e_score_correction_bias.normal_(0, 0.05)
            layer.self_attn.sinks.normal_()
            for module in layer.self_attn.modules():
                if hasattr(module, "position_bias"):
                    module.position_bias.normal_()
    return model


def test_deepseek_v4_parity(port_topk_with_our_tie_rule):
    """Logits within 1e-4 and the same 32 greedy tokens (the port's CSA indexer gets our top-k tie rule)."""
    src = _deepseek_v4()
    ours = from_transformers(src)
    ours.config.indexer_implementation = "eager"  # the float32 reference selection ("auto" may pick the bf16 kernel)
    assert ours.config.attention_sparsity == ["sliding", "csa", "hca", "csa"]
    # YaRN frequencies only (docs/decisions.md#d8-v4-yarn)
    assert ours.config.compress_rope_parameters["attention_factor"] == 1.0
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert (src(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(src.generate(ids, **kw), ours.generate(ids, **kw))
