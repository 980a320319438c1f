"""`gqa` attention: multi-head / grouped-query attention with (partial) RoPE, Llama-compatible weights.

With `attention_sparsity[i] == "dsa"` a lightning indexer (fed the hidden states, as there is no query
latent) picks the keys each query attends to, and attention runs over those only (see `sparsity.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from .attention_common import AttentionAux, attention_kernel, eager_attention_forward, past_length
from .cache_append import cache_update
from .indexer import LightningIndexer
from .rope import apply_rope
from .sparse_attention import sparse_attention
from .sparsity import build_selector


class GQAAttention(nn.Module):
    kind = "gqa"

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim = int(self.head_dim * config.partial_rotary_factor)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        # the indexer is fed the hidden states (no query latent); it stays registered here (`self_attn.indexer.*`)
        dsa = config.attention_sparsity[layer_idx] == "dsa"
        self.indexer = LightningIndexer(config, config.hidden_size) if dsa else None
        self.selector = build_selector(config, layer_idx, self.indexer)

    @staticmethod
    def rope_dim(config) -> int:
        return int(config.head_dim * config.partial_rotary_factor)

    def _rope(self, x, cos, sin):
        if self.rotary_dim == self.head_dim:
            return apply_rope(x, cos, sin, interleaved=False)
        rot, rest = x.split([self.rotary_dim, self.head_dim - self.rotary_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleaved=False), rest), dim=-1)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: dict, attention_mask, past_key_values=None,
                key_padding: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, AttentionAux]:
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, H, S, D]
        k = self.k_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(hidden_states).view(b, s, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings[self.kind]
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        # before this layer's update; only DSA positions its queries by it (a static layer's length is a device
        # tensor: reading it costs a sync, so dense layers skip it)
        past_len = past_length(past_key_values, self.layer_idx) if self.indexer is not None else 0
        if past_key_values is not None:
            k, v = cache_update(past_key_values, self.layer_idx, k, v)  # [B, Hkv, T, D]
        selection = self.selector(hidden_states, hidden_states, position_embeddings.get("indexer"), past_key_values,
                                  past_len, key_padding)
        if selection.idx is not None:  # attend to the selected keys only
            return_probs = selection.return_probs or bool(kwargs.get("output_attentions"))
            out, weights = self._sparse(q, k, v, selection.idx, return_probs)
        elif selection.return_probs:  # dense warm-up: the indexer learns the probabilities, from the eager kernel
            out, weights = eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling)
        else:
            out, weights = attention_kernel(self.config)(
                self, q, k, v, attention_mask, scaling=self.scaling,
                dropout=self.config.attention_dropout if self.training else 0.0, **kwargs,
            )
        return self.o_proj(out.reshape(b, s, -1)), self.selector.aux(selection, weights, self.training)

    def _sparse(self, q, k, v, idx, return_probs: bool):
        """q [B, H, S, D], k/v [B, Hkv, T, D]: each query group attends to its selected positions only."""
        b, _, s, d = q.shape
        groups = q.transpose(1, 2).reshape(b, s, self.num_kv_heads, self.num_key_value_groups, d)
        flat_k, flat_v = (x.transpose(1, 2).flatten(2) for x in (k, v))  # [B, T, Hkv·D]
        out, probs = sparse_attention([groups], [flat_k], flat_v, idx, self.scaling, return_probs=return_probs)
        return out.reshape(b, s, self.num_heads, d), probs.flatten(2, 3) if probs is not None else None
