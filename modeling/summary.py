"""Size figures of a config without allocating weights: total and per-token-active parameters, KV bytes."""
from __future__ import annotations

import torch

from .engram_table import EngramTable
from .modeling_seekv4 import SeekV4ForCausalLM
from .moe import Experts

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_elements_per_token(config) -> list[int]:
    """Cached elements per token for each layer: exactly what that attention kind stores."""
    per_layer = []
    for kind, sparsity in zip(config.attention_types, config.attention_sparsity):
        if kind == "mla":
            per_layer.append(config.kv_lora_rank + config.qk_rope_head_dim)  # latent + shared RoPE key
        elif kind == "gqa":
            per_layer.append(2 * config.num_key_value_heads * config.head_dim)  # keys + values
        elif sparsity == "csa":  # one K=V entry and one index key per csa_compress_ratio tokens
            per_layer.append((config.head_dim + config.index_head_dim) / config.csa_compress_ratio)
        elif sparsity == "hca":
            per_layer.append(config.head_dim / config.hca_compress_ratio)
        else:  # sliding: a fixed window, nothing per token
            per_layer.append(0)
        if kind != "v4" and sparsity == "dsa":
            per_layer[-1] += config.index_head_dim  # DSA index key
    return per_layer


def parameter_counts(config) -> dict[str, int]:
    """Built on the meta device, so even 671B-parameter shapes cost no memory."""
    with torch.device("meta"):
        model = SeekV4ForCausalLM(config)
    seen, total, routed, routed_active, engram, engram_active = set(), 0, 0, 0, 0, 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            total += p.numel()
            if isinstance(module, Experts):
                routed += p.numel()
                routed_active += p.numel() * config.num_experts_per_tok // config.n_routed_experts
            elif isinstance(module, EngramTable):  # a token reads one row per hash head and n-gram order
                engram += p.numel()
                engram_active += (config.engram_max_ngram_size - 1) * config.engram_n_heads * module.dim
    active = total - routed + routed_active - engram + engram_active
    return {"total": total, "active_per_token": active, "routed_experts": routed, "engram_tables": engram}


def schedule_runs(config) -> list[tuple[int, int, str, str]]:
    """Consecutive layers with the same (attention[/sparsity], ffn) kinds: [(first, last, attention, ffn)]."""
    runs = []
    kinds = [(a if s in ("dense", "sliding") and a != "v4" else f"{a}/{s}", f)
             for a, s, f in zip(config.attention_types, config.attention_sparsity, config.ffn_types)]
    for i, kind in enumerate(kinds):
        if runs and runs[-1][2:] == kind:
            runs[-1] = (runs[-1][0], i, *kind)
        else:
            runs.append((i, i, *kind))
    return runs
