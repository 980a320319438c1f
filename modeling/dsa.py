"""DeepSeek Sparse Attention glue shared by the `mla` and `gqa` kinds: selection and indexer training.

Training recipe (V3.2, spec §1.4), chosen by `config.dsa_mode`:
  * `dense_warmup`: the main attention stays dense; the indexer is trained by KL(p_t || softmax(I_t))
    where p_t is the main attention summed over heads and L1-normalised over the visible keys. (Freezing
    every other weight is the training recipe's job: `freeze_all_but_indexers(model)`.)
  * `sparse`: attention over the top-k only; the KL is restricted to the selected set S_t.
The indexer's inputs are detached in both modes, so the indexer learns only from its KL and the rest of
the model only from the LM loss. The KL is computed while training when `indexer_loss_weight > 0`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_common import AttentionAux
from .cache_append import cache_update_indexer
from .indexer import LightningIndexer, index_scores, visible_keys


@dataclass
class Selection:
    idx: torch.Tensor | None  # [B, S, k] selected key positions, -1 = none
    q: torch.Tensor  # indexer queries [B, S, Hi, D]
    w: torch.Tensor  # indexer head weights [B, S, Hi]
    keys: torch.Tensor  # all index keys so far [B, T, D]
    q_positions: torch.Tensor  # [1, S] cache index of each query
    key_padding: torch.Tensor | None  # [B, T] True = real token
    wants_loss: bool


def kl_to_indexer(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, query_valid: torch.Tensor):
    """Σ_s p log(p / softmax(I)) per query, averaged over real queries. target/logits/valid [B, S, K]."""
    target = target * valid
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q = torch.log_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=-1)
    per_query = (torch.xlogy(target, target) - target * log_q).sum(-1)  # [B, S]
    return (per_query * query_valid).sum() / query_valid.sum().clamp_min(1)


def freeze_all_but_indexers(model) -> int:
    """Dense warm-up recipe: only indexer parameters train. Returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(".indexer." in name)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


class DSAMixin:
    """Adds an optional lightning indexer to an attention module (`self.indexer` is None when dense)."""

    def init_dsa(self, config, layer_idx: int, q_input_dim: int):
        dsa = config.attention_sparsity[layer_idx] == "dsa"
        self.indexer = LightningIndexer(config, q_input_dim) if dsa else None

    def dsa_select(self, hidden, q_input, rope, past_key_values, past_len: int, key_padding) -> Selection:
        cos, sin = rope
        # detached: the indexer is trained only by its own loss (spec §1.4)
        hidden, q_input = hidden.detach(), q_input.detach()
        keys = self.indexer.keys(hidden, cos, sin)
        if past_key_values is not None:
            keys = cache_update_indexer(past_key_values, self.layer_idx, keys)
        q, w = self.indexer.queries(hidden, q_input, cos, sin)
        q_positions = (torch.arange(hidden.shape[1], device=hidden.device) + past_len)[None]
        wants_loss = self.training and self.config.indexer_loss_weight > 0
        sparse = self.config.dsa_mode == "sparse"
        idx = self.indexer.select(q, w, keys, q_positions + 1, key_padding) if sparse or wants_loss else None
        return Selection(idx, q, w, keys, q_positions, key_padding, wants_loss)

    def dsa_aux(self, sel: Selection, probs: torch.Tensor | None) -> AttentionAux:
        """probs: sparse mode [B, S, H, k] over sel.idx; dense warm-up [B, H, S, T] over all keys."""
        sparse = self.config.dsa_mode == "sparse"
        loss = recall = None
        if sel.wants_loss:
            b, s = sel.q.shape[:2]
            query_valid = (sel.key_padding[:, sel.q_positions[0]] if sel.key_padding is not None
                           else torch.ones(b, s, dtype=torch.bool, device=sel.q.device)).float()
            if sparse:
                target = probs.detach().sum(2)  # [B, S, k]
                logits = index_scores(sel.q, sel.w, sel.keys, sel.idx)
                loss = kl_to_indexer(target, logits, sel.idx >= 0, query_valid)
            else:
                valid = visible_keys(sel.q_positions + 1, sel.keys.shape[1], sel.key_padding)
                target = probs.detach().float().sum(1)  # [B, S, T]
                logits = index_scores(sel.q, sel.w, sel.keys)
                loss = kl_to_indexer(target, logits, valid.expand_as(logits), query_valid)
                mass = target * valid / (target * valid).sum(-1, keepdim=True).clamp_min(1e-12)
                captured = mass.gather(-1, sel.idx.clamp(min=0)) * (sel.idx >= 0)
                recall = (captured.sum(-1) * query_valid).sum() / query_valid.sum().clamp_min(1)
        weights = None
        if probs is not None and not self.training and sparse:  # as dense [B, H, S, T] for output_attentions
            t = sel.keys.shape[1]
            dense = probs.new_zeros(*probs.shape[:3], t + 1)
            dense.scatter_add_(-1, torch.where(sel.idx < 0, t, sel.idx)[:, :, None].expand_as(probs), probs)
            weights = dense[..., :t].transpose(1, 2)
        elif probs is not None and not sparse:
            weights = probs
        return AttentionAux(weights=weights, indexer_loss=loss, indexer_recall=recall)
