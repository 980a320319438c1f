"""Size figures of a config without allocating weights: total and per-token-active parameters, KV bytes."""
from __future__ import annotations

import torch

from .attention_kinds import attention_kinds
from .engram_table import EngramTable
from .modeling_seekv4 import SeekV4ForCausalLM
from .moe import Experts

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_cache_elements_per_token(config) -> list[int | float]:
    """Cached elements each token adds, per layer: exactly what that layer's attention kind stores."""
    return [kind.cache_elements_per_token(config) for kind in attention_kinds(config)]


def kv_cache_bytes_per_token(config, dtype_bytes: int) -> list[int | float]:
    """Cached bytes each token adds, per layer, in a model of `dtype_bytes`-byte floats (FP8 records with
    `kv_cache_dtype="fp8_e4m3"`)."""
    return [kind.cache_bytes_per_token(config, dtype_bytes) for kind in attention_kinds(config)]


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
    kinds = [(attention.name, ffn) for attention, ffn in zip(attention_kinds(config), config.ffn_types)]
    for i, kind in enumerate(kinds):
        if runs and runs[-1][2:] == kind:
            runs[-1] = (runs[-1][0], i, *kind)
        else:
            runs.append((i, i, *kind))
    return runs
