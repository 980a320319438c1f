"""Multi-token prediction (DeepSeek-V3 §2.2; V4 `MTPBlock`; docs/mtp.md).

Module k (k = 1..D) at position t predicts token t+1+k. Its input combines the previous depth's residual
streams (the main model's final streams, before the head, for k = 1) with the embedding of token t+k:
    X = W^h RMSNorm(H) (per stream) + W^e RMSNorm(Emb(x_{t+k})) (broadcast over streams)
then one decoder block, its own residual head and final norm; the LM head and embedding are shared with
the main model. Training follows the V3 shift convention (docs/decisions.md#d6-mtp-alignment). The block takes
the last layer's kinds, except in V4 models, whose MTP block attends over the sliding window only and routes its
MoE by score.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .norm import RMSNorm
from .residual import build_head


class MTPModule(nn.Module):
    def __init__(self, config, block: nn.Module):
        super().__init__()
        d = config.hidden_size
        self.enorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.block = block
        self.hc_head = build_head(config)
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)

    def forward(self, streams, next_embeds, next_ids, **block_kwargs):
        """streams [B, S, n, H] (previous depth), next_embeds [B, S, H] = Emb(x_{t+k}), next_ids [B, S]
        -> (streams of this depth [B, S, n, H], normed hidden [B, S, H] for the shared LM head)."""
        x = self.h_proj(self.hnorm(streams)) + self.e_proj(self.enorm(next_embeds)).unsqueeze(2)
        streams, _, _ = self.block(x, past_key_values=None, input_ids=next_ids, **block_kwargs)
        return streams, self.norm(self.hc_head(streams))


def mtp_block_config(config):
    """Config to build an MTP block from, as layer `num_hidden_layers - 1`: the last layer's kinds, or for a
    `v4` last layer `sliding` attention (compress ratio 0) and `moe` instead of `hash_moe` (V4 `MTPBlock`)."""
    if config.attention_types[-1] != "v4":
        return config
    config = copy.deepcopy(config)
    config.attention_sparsity = [*config.attention_sparsity[:-1], "sliding"]
    config.ffn_types = [*config.ffn_types[:-1], "moe" if config.ffn_types[-1] == "hash_moe" else config.ffn_types[-1]]
    return config


def shift_left(x: torch.Tensor, k: int, fill) -> torch.Tensor:
    """[B, S, ...] -> x[:, k:] padded at the end with `fill` back to length S."""
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1)
