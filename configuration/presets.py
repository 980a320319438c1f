"""Named configurations. `tiny*` presets are for tests; full-size presets are shapes only (never built in tests)."""
from __future__ import annotations

_TINY_COMMON = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=4, intermediate_size=128, max_position_embeddings=2048,
    num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)

_DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, num_hidden_layers=61, intermediate_size=18432,
    max_position_embeddings=163840, num_attention_heads=128, num_key_value_heads=128,
    attention_types=["mla"] * 61, first_k_dense_replace=3,
    ffn_types=["dense"] * 3 + ["moe"] * 58,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
    n_group=8, topk_group=4, scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
    rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
    bos_token_id=0, eos_token_id=1,
)

_DEEPSEEK_V4 = dict(
    vocab_size=129280, max_position_embeddings=1048576, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
    sliding_window=128, csa_compress_ratio=4, hca_compress_ratio=128, index_n_heads=64, index_head_dim=128,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    # YaRN frequencies only: the reference does not scale cos/sin (attention_factor 1, docs/decisions.md#d8-v4-yarn)
    compress_rope_parameters=dict(rope_type="yarn", rope_theta=160000.0, factor=16.0, attention_factor=1.0,
                                  original_max_position_embeddings=65536, beta_fast=32, beta_slow=1),
    n_shared_experts=1, num_experts_per_tok=6, scoring_func="sqrtsoftplus", swiglu_limit=10.0, norm_topk_prob=True,
    residual_kind="mhc", hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, num_nextn_predict_layers=1,
    kv_cache_fp8_block=64,  # FP8 cache option: 448 non-RoPE dims = 7 blocks of 64 (the reference's act_quant block)
    bos_token_id=0, eos_token_id=1,
)

# tiny V4-family shapes: 64-d K=V head with a 16-d RoPE tail, window 32, CSA 4:1 / HCA 32:1
_TINY_V4 = dict(
    _TINY_COMMON, max_position_embeddings=131072, attention_types=["v4"] * 4,
    head_dim=64, qk_rope_head_dim=16, q_lora_rank=48, o_groups=2, o_lora_rank=32, sliding_window=32,
    csa_compress_ratio=4, hca_compress_ratio=32, index_n_heads=4, index_head_dim=16, index_topk=16,
    compress_rope_parameters=dict(rope_type="yarn", rope_theta=160000.0, factor=16.0, attention_factor=1.0,
                                  original_max_position_embeddings=8192, beta_fast=32, beta_slow=1),
    moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0, residual_kind="mhc", hc_mult=4,
    kv_cache_fp8_block=16,
)

PRESETS: dict[str, dict] = {
    # MLA with low-rank queries, dense first layer then MoE (group-limited routing), one hash-routed layer.
    "tiny": dict(
        _TINY_COMMON,
        attention_types=["mla"] * 4,
        ffn_types=["dense", "hash_moe", "moe", "moe"],
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, scoring_func="sigmoid", routed_scaling_factor=2.5,
    ),
    # Dense grouped-query attention (Llama-style): the shape pretrained dense models are hosted in.
    "tiny-gqa": dict(
        _TINY_COMMON,
        attention_types=["gqa"] * 4, ffn_types=["dense"] * 4, num_key_value_heads=2,
    ),
    # DeepSeek-V3 / V3.1 (671B total, 37B active). Shape from the official config.json.
    "deepseek-v3": dict(_DEEPSEEK_V3),
    # DeepSeek-V3.2 (-Exp): V3 + DeepSeek Sparse Attention in every layer (official config_671B_v3.2.json).
    "deepseek-v3.2": dict(
        _DEEPSEEK_V3, attention_sparsity=["dsa"] * 61,
        index_n_heads=64, index_head_dim=128, index_rope_head_dim=64, index_topk=2048,
    ),
    "tiny-deepseek-v3.2": dict(
        _TINY_COMMON, attention_types=["mla"] * 4, ffn_types=["dense", "moe", "moe", "moe"],
        attention_sparsity=["dsa"] * 4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5,
        index_n_heads=4, index_head_dim=16, index_rope_head_dim=8, index_topk=16,
    ),
    # The system of shared/seed: MLA + DSA + MoE + mHC + Engram + MTP. Full size = the V3.2 shape with V4's
    # mHC (4 streams, 20 Sinkhorn iterations) and V4.1's Engram settings (App. A.4 / §6.7: orders 2-4,
    # 8 heads × 256, 16M base rows per head, no short conv) at early layers 1 and 15, one MTP module.
    "seed-v4": dict(
        _DEEPSEEK_V3, attention_sparsity=["dsa"] * 61,
        index_n_heads=64, index_head_dim=128, index_rope_head_dim=64, index_topk=2048,
        residual_kind="mhc", hc_mult=4, hc_sinkhorn_iters=20,
        engram_layer_ids=[1, 15], engram_max_ngram_size=4, engram_n_heads=8, engram_head_dim=256,
        engram_vocab_size=16_000_000, engram_kernel_size=0, engram_pad_id=2, num_nextn_predict_layers=1,
    ),
    "tiny-seed-v4": dict(
        _TINY_COMMON, max_position_embeddings=131072, attention_types=["mla"] * 4,
        ffn_types=["dense", "hash_moe", "moe", "moe"], attention_sparsity=["dsa"] * 4,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        scoring_func="sigmoid", routed_scaling_factor=2.5,
        index_n_heads=4, index_head_dim=16, index_rope_head_dim=8, index_topk=16,
        residual_kind="mhc", hc_mult=4, engram_layer_ids=[1], engram_max_ngram_size=3, engram_n_heads=2,
        engram_head_dim=16, engram_vocab_size=[1021, 1021], num_nextn_predict_layers=1,
    ),
    # DeepSeek-V4 (the official config.json files): hybrid sliding / CSA / HCA attention, mHC,
    # sqrt-softplus MoE with hash routing in the first 3 layers, clamped SwiGLU, one MTP module.
    "deepseek-v4-flash": dict(
        _DEEPSEEK_V4, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, q_lora_rank=1024,
        attention_types=["v4"] * 43, attention_sparsity=["sliding"] * 2 + ["csa", "hca"] * 20 + ["csa"],
        ffn_types=["hash_moe"] * 3 + ["moe"] * 40, o_groups=8, index_topk=512,
        n_routed_experts=256, moe_intermediate_size=2048, routed_scaling_factor=1.5,
    ),
    "deepseek-v4-pro": dict(
        _DEEPSEEK_V4, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
        attention_types=["v4"] * 61, attention_sparsity=["hca"] * 2 + ["csa", "hca"] * 29 + ["csa"],
        ffn_types=["hash_moe"] * 3 + ["moe"] * 58, o_groups=16, index_topk=1024,
        n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
    ),
    # DeepSeek-V4.1-Flash (the V4.1 training port's config): 40 MoE layers (no hash layers listed), hidden 5120,
    # 384 experts of 2304,
    # mHC, Engram at layers 1 and 14 (§6.7: orders 2-4, 8 heads x 256, 16M base rows per head, no short conv,
    # compressed vocab 99,092, pad id 2). Attention follows V4-Flash's sliding / CSA / HCA schedule: V4.1's CSA2
    # (2:1 and 1:1 compression with cross-layer KV sharing) is not implemented. DSpark drafts replace MTP (not
    # modelled: no MTP module). rms_norm_eps stays V4's 1e-6 (NeMo's 1e-20 is unverified,
    # docs/decisions.md#d4-v41-rms-norm-eps).
    "deepseek-v4.1-flash": dict(
        _DEEPSEEK_V4, hidden_size=5120, num_hidden_layers=40, num_attention_heads=64, q_lora_rank=1280,
        attention_types=["v4"] * 40, attention_sparsity=["sliding"] * 2 + ["csa", "hca"] * 19,
        ffn_types=["moe"] * 40, o_groups=8, index_n_heads=32, index_topk=512,
        n_routed_experts=384, moe_intermediate_size=2304, routed_scaling_factor=1.5, num_nextn_predict_layers=0,
        engram_layer_ids=[1, 14], engram_max_ngram_size=4, engram_n_heads=8, engram_head_dim=256,
        engram_vocab_size=16_000_000, engram_kernel_size=0, engram_pad_id=2, engram_compressed_vocab_size=99_092,
    ),
    "tiny-deepseek-v4-flash": dict(
        _TINY_V4, attention_sparsity=["sliding", "csa", "hca", "csa"], ffn_types=["hash_moe", "moe", "moe", "moe"],
    ),
    "tiny-deepseek-v4.1-flash": dict(
        _TINY_V4, attention_sparsity=["sliding", "csa", "hca", "csa"], ffn_types=["moe"] * 4,
        engram_layer_ids=[1, 2], engram_max_ngram_size=4, engram_n_heads=2,
        engram_head_dim=16, engram_vocab_size=[1021, 1021, 1021], engram_kernel_size=0, engram_pad_id=2,
    ),
    "tiny-deepseek-v4-pro": dict(
        _TINY_V4, attention_sparsity=["hca", "hca", "csa", "hca"], ffn_types=["hash_moe", "hash_moe", "moe", "moe"],
        o_groups=4, index_topk=32, n_routed_experts=12, routed_scaling_factor=2.5,
    ),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_kwargs(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available presets: {list_presets()}.")
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
            for k, v in PRESETS[name].items()}
