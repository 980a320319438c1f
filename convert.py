"""Convert in-memory transformers models to seekv4 with identical function.

Supported sources: `LlamaForCausalLM` (-> `gqa` attention + `dense` FFN), `DeepseekV3ForCausalLM`
(-> `mla` attention + `dense`/`moe` FFN), `DeepseekV32ForCausalLM` (-> the same + DSA on every layer) and
`DeepseekV4ForCausalLM` (-> `v4` attention, `hash_moe`/`moe`, `mhc` residuals). Our module names follow
the transformers ones where the structure is the same, so conversion is a config translation, a few key
renames, and a strict state-dict load.
"""
from __future__ import annotations

import torch

from .configuration import SeekV4Config
from .modeling import SeekV4ForCausalLM

_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings",
    "rms_norm_eps", "initializer_range", "tie_word_embeddings", "num_attention_heads", "attention_bias",
    "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _rope_parameters(src) -> dict:
    rp = dict(src.rope_parameters or {})
    rope_type = rp.get("rope_type", "default")
    if rope_type not in ("default", "linear", "yarn"):
        raise ValueError(f"Cannot convert rope_type={rope_type!r}: seekv4 supports 'default', 'linear' and 'yarn'.")
    if rope_type == "yarn" and rp.get("factor") is None:
        rp["factor"] = src.max_position_embeddings / rp["original_max_position_embeddings"]
    return rp


def config_from_llama(src) -> SeekV4Config:
    if getattr(src, "mlp_bias", False):
        raise ValueError("Cannot convert a Llama model with mlp_bias=True: seekv4's dense FFN has no biases.")
    if src.hidden_act not in ("silu", "swish"):
        raise ValueError(f"Cannot convert hidden_act={src.hidden_act!r}: seekv4's FFN is SwiGLU (silu).")
    n = src.num_hidden_layers
    rp = _rope_parameters(src)
    return SeekV4Config(
        **{f: getattr(src, f) for f in _COMMON_FIELDS},
        num_key_value_heads=src.num_key_value_heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        partial_rotary_factor=rp.pop("partial_rotary_factor", 1.0),
        rope_parameters=rp, attention_types=["gqa"] * n, ffn_types=["dense"] * n,
    )


def config_from_deepseek_v3(src) -> SeekV4Config:
    return SeekV4Config(**_deepseek_v3_kwargs(src))


def _deepseek_v3_kwargs(src) -> dict:
    n = src.num_hidden_layers
    return dict(
        **{f: getattr(src, f) for f in _COMMON_FIELDS},
        rope_parameters=_rope_parameters(src),
        attention_types=["mla"] * n,
        ffn_types=["dense" if i < src.first_k_dense_replace else "moe" for i in range(n)],
        first_k_dense_replace=src.first_k_dense_replace,
        q_lora_rank=src.q_lora_rank, kv_lora_rank=src.kv_lora_rank, qk_nope_head_dim=src.qk_nope_head_dim,
        qk_rope_head_dim=src.qk_rope_head_dim, v_head_dim=src.v_head_dim,
        rope_interleave=bool(getattr(src, "rope_interleave", True)),  # V3.2 has no flag: always interleaved
        moe_intermediate_size=src.moe_intermediate_size, n_routed_experts=src.n_routed_experts,
        n_shared_experts=src.n_shared_experts, num_experts_per_tok=src.num_experts_per_tok,
        n_group=src.n_group or 1, topk_group=src.topk_group or 1, norm_topk_prob=bool(src.norm_topk_prob),
        routed_scaling_factor=src.routed_scaling_factor, scoring_func="sigmoid",
    )


def config_from_deepseek_v32(src) -> SeekV4Config:
    """V3.2 = V3 + a lightning indexer in every layer (its RoPE width is the main rope width)."""
    n = src.num_hidden_layers
    ffn = ["moe" if kind == "sparse" else "dense" for kind in src.mlp_layer_types]
    return SeekV4Config(**{
        **_deepseek_v3_kwargs(src), "ffn_types": ffn, "attention_sparsity": ["dsa"] * n,
        "index_n_heads": src.index_n_heads, "index_head_dim": src.index_head_dim,
        "index_rope_head_dim": src.qk_rope_head_dim, "index_topk": src.index_topk,
    })


_V4_SPARSITY = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                "heavily_compressed_attention": "hca"}


def config_from_deepseek_v4(src) -> SeekV4Config:
    n = src.num_hidden_layers
    rope = {name: {k: v for k, v in src.rope_parameters[name].items() if k != "partial_rotary_factor"}
            for name in ("main", "compress")}
    return SeekV4Config(
        **{f: getattr(src, f) for f in _COMMON_FIELDS if f not in ("intermediate_size", "attention_bias")},
        intermediate_size=src.intermediate_size,
        attention_types=["v4"] * n, attention_sparsity=[_V4_SPARSITY[t] for t in src.layer_types],
        ffn_types=["hash_moe" if t == "hash_moe" else "moe" for t in src.mlp_layer_types],
        head_dim=src.head_dim, qk_rope_head_dim=src.qk_rope_head_dim, q_lora_rank=src.q_lora_rank,
        o_groups=src.o_groups, o_lora_rank=src.o_lora_rank, sliding_window=src.sliding_window,
        csa_compress_ratio=src.compress_rates["compressed_sparse_attention"],
        hca_compress_ratio=src.compress_rates["heavily_compressed_attention"],
        index_n_heads=src.index_n_heads, index_head_dim=src.index_head_dim, index_topk=src.index_topk,
        rope_parameters=rope["main"], compress_rope_parameters=rope["compress"],
        moe_intermediate_size=src.intermediate_size, n_routed_experts=src.n_routed_experts, n_shared_experts=1,
        num_experts_per_tok=src.num_experts_per_tok, scoring_func=src.scoring_func, norm_topk_prob=True,
        routed_scaling_factor=src.routed_scaling_factor, swiglu_limit=src.swiglu_limit,
        residual_kind="mhc", hc_mult=src.hc_mult, hc_sinkhorn_iters=src.hc_sinkhorn_iters, hc_eps=src.hc_eps,
        num_nextn_predict_layers=0,  # the port does not instantiate its MTP block
    )


def _rename_deepseek_v4(key: str) -> str:
    """The port nests CSA's indexer inside the compressor; ours sits beside it (it has its own compressor)."""
    key = key.replace(".compressor.indexer.scorer.", ".indexer.")
    for name in ("position_bias", "kv_proj", "gate_proj", "kv_norm"):
        key = key.replace(f".compressor.indexer.{name}", f".indexer.compressor.{name}")
    return key.replace(".compressor.indexer.", ".indexer.")


KEY_RENAMES = {"deepseek_v4": _rename_deepseek_v4}

CONFIG_CONVERTERS = {"llama": config_from_llama, "deepseek_v3": config_from_deepseek_v3,
                     "deepseek_v4": config_from_deepseek_v4, "deepseek_v32": config_from_deepseek_v32}


def from_transformers(model: torch.nn.Module) -> SeekV4ForCausalLM:
    """Return a `SeekV4ForCausalLM` computing the same function as `model` (same dtype, CPU/device kept)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in CONFIG_CONVERTERS:
        raise ValueError(f"Cannot convert {type(model).__name__} (model_type={model_type!r}); supported model types: "
                         f"{sorted(CONFIG_CONVERTERS)}.")
    if not hasattr(model, "lm_head"):
        raise ValueError(f"Pass a *ForCausalLM model (with an lm_head), got {type(model).__name__}.")
    config = CONFIG_CONVERTERS[model_type](model.config)
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    with torch.device(param.device):
        ours = SeekV4ForCausalLM(config).to(param.dtype)
    n = config.num_hidden_layers  # checkpoints may store MTP layers after the decoder stack: not ours to load
    rename = KEY_RENAMES.get(model_type, lambda key: key)
    state = {rename(k): v for k, v in model.state_dict().items()
             if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Converting {type(model).__name__}: missing {missing}, unexpected {unexpected}.")
    return ours.train(model.training)
