"""Pieces every attention kind shares: the eager kernel, kernel dispatch, mask conversion, aux outputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


@dataclass
class AttentionAux:
    """What an attention layer reports besides its output."""

    weights: torch.Tensor | None = None  # attention probabilities (eager kernels, on request)
    indexer_loss: torch.Tensor | None = None  # DSA indexer KL, when training it
    indexer_recall: torch.Tensor | None = None  # dense warm-up: share of attention mass inside the top-k


def past_length(past_key_values, layer_idx: int = 0) -> int:
    """Tokens already cached for `layer_idx`, as a Python int snapshot. A static cache layer reports a live tensor
    that its `update` increments in place, so a value kept across the update would silently move on by S."""
    if past_key_values is None:
        return 0
    return int(past_key_values.get_seq_length(layer_idx))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * n_rep, T, D]."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def eager_attention_forward(module: nn.Module, query, key, value, attention_mask, scaling: float,
                            dropout: float = 0.0, **kwargs):
    """Reference kernel: materialises the [B, H, L, T] scores; returns ([B, L, H, Dv], probabilities)."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None and query.shape[2] > 1:
        attention_mask = causal_bool_mask(query.shape[2], key.shape[2], query.device)
    if attention_mask is not None:
        scores = apply_mask(scores, attention_mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def causal_bool_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """[1, 1, L, T]: the L queries are the last L of the T keys."""
    offset = kv_len - q_len
    return (torch.arange(q_len, device=device)[:, None] + offset >= torch.arange(kv_len, device=device))[None, None]


def apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masks from `create_causal_mask` are boolean (True = keep) for sdpa or additive floats for eager."""
    mask = mask[..., : scores.shape[-1]]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask


def attention_kernel(config):
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)
