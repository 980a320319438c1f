"""Sparse-attention selectors: which keys each query attends to, one interface for every `attention_sparsity` kind.

A selector maps (hidden states, the indexer's query input, positions, cache) to a `Selection`:
  * `idx` [B, S, k]: the key positions each query attends to (-1 = none), or None = every causal key (dense);
  * `dense`: an optional block of K=V rows every query may see, masked per query (V4 HCA's compressed entries);
  * `indexer`: what the indexer's training loss needs (`IndexerPicks`), when the selection came from an indexer.
The attention module then runs its kernel over the selection and hands the probabilities to `indexer_kl`, the one
indexer loss shared by DSA (sparse and dense warm-up) and V4 CSA.

Selectors own no parameters: the indexer and compressors stay registered on the attention module
(`self_attn.indexer.*`, `self_attn.compressor.*`) so checkpoint keys are those of the released models, and a
selector holds references to them.

Indexer training (DeepSeek-V3.2 paper §2.1), chosen by `config.dsa_mode`:
  * `dense_warmup`: the main attention stays dense; the indexer is trained by KL(p_t || softmax(I_t))
    where p_t is the main attention summed over heads and L1-normalised over the visible keys. (Freezing
    every other weight is the training recipe's job: `freeze_all_but_indexers(model)`.)
  * `sparse`: attention over the top-k only; the KL is restricted to the selected set S_t.
The indexer's inputs are detached in both modes, so the indexer learns only from its KL and the rest of
the model only from the LM loss. The KL is computed while training when `indexer_loss_weight > 0`.
V4 CSA uses the sparse-stage objective over its compressed entries (V4's own objective is not published).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention_common import AttentionAux
from .cache_append import cache_update_indexer
from .indexer import LightningIndexer, index_scores, visible_keys


@dataclass
class IndexerPicks:
    """The indexer's side of a selection, kept for its loss."""

    q: torch.Tensor  # indexer queries [B, S, Hi, D]
    w: torch.Tensor  # indexer head weights [B, S, Hi]
    keys: torch.Tensor  # index keys [B, T, D]
    picked: torch.Tensor  # [B, S, k] top-k positions in `keys`, -1 = none
    query_valid: torch.Tensor | None  # [B, S] bool: queries the loss averages over (None: no loss)
    visible: torch.Tensor | None = None  # [B or 1, S, T]: dense warm-up, the KL runs over every visible key


@dataclass
class Selection:
    idx: torch.Tensor | None  # [B, S, k] attended key positions, -1 = none; None = every causal key
    dense: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows [B, N, D], visible [B, S, N]) attended densely
    indexer: IndexerPicks | None = None  # set when an indexer chose the keys
    wants_loss: bool = False  # training the indexer: the kernel must return its probabilities
    return_probs: bool = False  # the kernel must return its probabilities (the loss; DSA dense warm-up's eager path)


def kl_to_indexer(target: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor, query_valid: torch.Tensor):
    """Σ_s p log(p / softmax(I)) per query, averaged over real queries. target/logits/valid [B, S, K]."""
    target = target * valid
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    log_q = torch.log_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=-1)
    per_query = (torch.xlogy(target, target) - target * log_q).sum(-1)  # [B, S]
    return (per_query * query_valid).sum() / query_valid.sum().clamp_min(1)


def indexer_kl(mass: torch.Tensor, picks: IndexerPicks) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The indexer loss: KL(main attention || softmax(index scores)), and the top-k recall in dense warm-up.

    mass: the main attention's probabilities summed over heads, [B, S, k] on `picks.picked` (sparse: the KL runs
    over the selected set) or [B, S, T] on every key (`picks.visible` given: dense warm-up). Returns the KL averaged
    over `picks.query_valid` and, in dense warm-up, the share of attention mass the top-k captures (else None).
    """
    target, query_valid = mass.detach(), picks.query_valid.float()
    if picks.visible is None:
        logits = index_scores(picks.q, picks.w, picks.keys, picks.picked)
        return kl_to_indexer(target, logits, picks.picked >= 0, query_valid), None
    logits = index_scores(picks.q, picks.w, picks.keys)
    valid = picks.visible
    loss = kl_to_indexer(target, logits, valid.expand_as(logits), query_valid)
    share = target * valid / (target * valid).sum(-1, keepdim=True).clamp_min(1e-12)
    captured = share.gather(-1, picks.picked.clamp(min=0)) * (picks.picked >= 0)
    recall = (captured.sum(-1) * query_valid).sum() / query_valid.sum().clamp_min(1)
    return loss, recall


def freeze_all_but_indexers(model) -> int:
    """Dense warm-up recipe: only indexer parameters train. Returns the number of trainable parameters."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(".indexer." in name)
        trainable += param.numel() if param.requires_grad else 0
    return trainable


class DenseSelector:
    """`dense`: every causal key (the attention mask says which)."""

    def __call__(self, hidden, q_input, rope, past_key_values, past_len: int, key_padding) -> Selection:
        return Selection(idx=None)

    def aux(self, selection: Selection, weights: torch.Tensor | None, training: bool) -> AttentionAux:
        return AttentionAux(weights=weights)


class DSASelector(DenseSelector):
    """`dsa` (DeepSeek-V3.2): a lightning indexer picks the top-k keys of each query. In `dense_warmup` mode the
    attention stays dense (`idx` None) and the picks serve the indexer's loss only."""

    def __init__(self, indexer: LightningIndexer, config, layer_idx: int):
        self.indexer, self.config, self.layer_idx = indexer, config, layer_idx

    def __call__(self, hidden: torch.Tensor, q_input: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 past_key_values, past_len: int, key_padding: torch.Tensor | None) -> Selection:
        """hidden [B, S, H], q_input [B, S, Q] (MLA: the query latent), rope: the indexer's (cos, sin)."""
        cos, sin = rope
        # detached: the indexer is trained only by its own loss
        hidden, q_input = hidden.detach(), q_input.detach()
        keys = self.indexer.keys(hidden, cos, sin)  # [B, S, D]
        if past_key_values is not None:
            keys = cache_update_indexer(past_key_values, self.layer_idx, keys)  # [B, T, D]
        wants_loss = self.indexer.training and self.config.indexer_loss_weight > 0
        sparse = self.config.dsa_mode == "sparse"
        if not (sparse or wants_loss):  # dense warm-up, not training the indexer
            return Selection(idx=None, return_probs=True)
        q, w = self.indexer.queries(hidden, q_input, cos, sin)
        q_positions = (torch.arange(hidden.shape[1], device=hidden.device) + past_len)[None]  # [1, S]
        picked = self.indexer.select(q, w, keys, q_positions + 1, key_padding)  # [B, S, k]
        query_valid = None  # only the loss reads it
        if wants_loss:
            query_valid = (key_padding[:, q_positions[0]] if key_padding is not None
                           else torch.ones(q.shape[:2], dtype=torch.bool, device=q.device))
        visible = None if sparse else visible_keys(q_positions + 1, keys.shape[1], key_padding)
        picks = IndexerPicks(q, w, keys, picked, query_valid, visible)
        return Selection(idx=picked if sparse else None, indexer=picks, wants_loss=wants_loss,
                         return_probs=wants_loss or not sparse)

    def aux(self, selection: Selection, probs: torch.Tensor | None, training: bool) -> AttentionAux:
        """probs: sparse [B, S, H, k] over `selection.idx`; dense warm-up [B, H, S, T] over all keys."""
        sparse = selection.idx is not None
        loss = recall = None
        if selection.wants_loss:
            mass = probs.sum(2) if sparse else probs.float().sum(1)  # summed over heads: [B, S, k] or [B, S, T]
            loss, recall = indexer_kl(mass, selection.indexer)
        weights = probs
        if probs is not None and sparse:
            # as dense [B, H, S, T] for output_attentions
            weights = None if training else _scatter_dense(probs, selection.idx, selection.indexer.keys.shape[1])
        return AttentionAux(weights=weights, indexer_loss=loss, indexer_recall=recall)


def _scatter_dense(probs: torch.Tensor, idx: torch.Tensor, num_keys: int) -> torch.Tensor:
    """probs [B, S, H, k] over idx [B, S, k] -> [B, H, S, T] (zero off the selection)."""
    dense = probs.new_zeros(*probs.shape[:3], num_keys + 1)
    dense.scatter_add_(-1, torch.where(idx < 0, num_keys, idx)[:, :, None].expand_as(probs), probs)
    return dense[..., :num_keys].transpose(1, 2)


def build_selector(config, layer_idx: int, indexer: LightningIndexer | None) -> DenseSelector:
    """The selector of a `gqa` / `mla` layer: `dsa` with its indexer, else dense."""
    return DSASelector(indexer, config, layer_idx) if indexer is not None else DenseSelector()


# DeepSeek-V4 (`sliding`, `csa`, `hca`): every query sees the last `window` rows of the K=V buffer; compressed
# layers add entries of their compressor. Queries attend in chunks, so a selector returns a `WindowKeys` (the call's
# key set) whose `rows(rows)` gives each chunk's Selection: memory stays O(chunk · (window + k)).


@dataclass
class WindowKeys:
    """`sliding`: one call's key set, the K=V window buffer [up to window - 1 past rows, then the S new ones]."""

    keys: torch.Tensor  # [B, P + S (+ N), D]: window rows, then (compressed layers) N compressed entries
    padding: torch.Tensor  # [B, P + S] True = real token
    window: int
    query_count: int  # S: the queries are the last S window rows

    @property
    def num_window(self) -> int:
        return self.padding.shape[1]

    @property
    def num_compressed(self) -> int:
        return self.keys.shape[1] - self.num_window

    def rows(self, rows: torch.Tensor) -> Selection:
        """rows [Lc]: one chunk's query indices -> idx [B, Lc, window] into `keys`, -1 = none."""
        b = self.padding.shape[0]
        local = torch.arange(self.window, device=rows.device)
        idx = (self.num_window - self.query_count + rows)[:, None] - (self.window - 1) + local  # [Lc, W]
        ok = (idx >= 0) & self.padding.gather(1, idx.clamp(min=0).flatten()[None].expand(b, -1)).view(b, *idx.shape)
        return Selection(idx=torch.where(ok, idx, -1))  # [B, Lc, W]


@dataclass
class HCAKeys(WindowKeys):
    """`hca`: the window + every complete compressed entry, attended densely (one matmul per chunk)."""

    limit: torch.Tensor | None = None  # [B, S] entries i < limit are complete for each query: ⌊(t+1)/m⌋

    def rows(self, rows: torch.Tensor) -> Selection:
        selection = super().rows(rows)
        entries = self.keys[:, self.num_window:]
        visible = torch.arange(entries.shape[1], device=rows.device) < self.limit[:, rows, None]  # [B, Lc, N]
        selection.dense = (entries, visible)
        return selection


@dataclass
class CSAKeys(WindowKeys):
    """`csa`: the window + the top-k compressed entries the indexer picks for each query."""

    limit: torch.Tensor | None = None  # [B, S] entries i < limit are complete for each query
    indexer: nn.Module | None = None  # the layer's V4Indexer (its `select` reads the top-k)
    index_q: torch.Tensor | None = None  # [B, S, Hi, D]
    index_w: torch.Tensor | None = None  # [B, S, Hi]
    index_keys: torch.Tensor | None = None  # [B, N, D] compressed index entries
    wants_loss: bool = False

    def rows(self, rows: torch.Tensor) -> Selection:
        selection = super().rows(rows)
        q, w = self.index_q[:, rows], self.index_w[:, rows]
        chosen = self.indexer.select(q, w, self.index_keys, self.limit[:, rows])  # [B, Lc, k] into the entries
        selection.idx = torch.cat((selection.idx, torch.where(chosen >= 0, chosen + self.num_window, -1)), dim=-1)
        if self.wants_loss:  # no entry before the first window completes (S < ratio): no KL term for that query
            real = self.padding[:, self.num_window - self.query_count:][:, rows]
            selection.indexer = IndexerPicks(q, w, self.index_keys, chosen, real & (chosen >= 0).any(-1))
            selection.wants_loss = selection.return_probs = True
        return selection


class SlidingSelector:
    """`sliding`: the last `window` tokens, the query itself included."""

    def __init__(self, window: int):
        self.window = window

    def __call__(self, hidden: torch.Tensor, q_latent: torch.Tensor, window_kv: torch.Tensor, padding: torch.Tensor,
                 position_ids: torch.Tensor, rope, states: dict) -> WindowKeys:
        """window_kv [B, P + S, D] (past rows then new), padding [B, P + S], position_ids [B, S], rope: the queries'
        (cos, sin) [B or 1, S, dr/2] and the RotaryEmbedding compressed entries are rotated with (entry i to
        position i·m), states: the layer's compressor states (cache or per call)."""
        return WindowKeys(window_kv, padding, self.window, hidden.shape[1])


class HCASelector(SlidingSelector):
    """`hca`: the window + every complete entry of a non-overlapping compressor (ratio m = 128 at full size)."""

    def __init__(self, window: int, compressor, ratio: int):
        super().__init__(window)
        self.compressor, self.ratio = compressor, ratio

    def _entries(self, hidden, window_kv, padding, position_ids, rope, states):
        real = padding[:, -hidden.shape[1]:]
        entries = self.compressor(hidden, position_ids, real, states["kv"], rope[2]).entries  # [B, N, D]
        limit = (position_ids + 1) // self.ratio  # entries i < ⌊(t+1)/m⌋ are complete
        return torch.cat((window_kv, entries), dim=1), real, limit

    def __call__(self, hidden, q_latent, window_kv, padding, position_ids, rope, states) -> HCAKeys:
        keys, _, limit = self._entries(hidden, window_kv, padding, position_ids, rope, states)
        return HCAKeys(keys, padding, self.window, hidden.shape[1], limit=limit)


class CSASelector(HCASelector):
    """`csa`: the window + the top-k entries (overlapping compressor, m = 4) a lightning indexer picks; the indexer
    scores its own compressed index entries."""

    def __init__(self, window: int, compressor, ratio: int, indexer, config):
        super().__init__(window, compressor, ratio)
        self.indexer, self.config = indexer, config

    def __call__(self, hidden, q_latent, window_kv, padding, position_ids, rope, states) -> CSAKeys:
        keys, real, limit = self._entries(hidden, window_kv, padding, position_ids, rope, states)
        cos, sin, rotary = rope
        # detached: the indexer learns only from its own loss
        hidden, q_latent = hidden.detach(), q_latent.detach()
        index_keys = self.indexer.compressor(hidden, position_ids, real, states["index"], rotary).entries
        q, w = self.indexer.queries(hidden, q_latent, cos, sin)
        wants_loss = self.indexer.training and self.config.indexer_loss_weight > 0
        return CSAKeys(keys, padding, self.window, hidden.shape[1], limit=limit, indexer=self.indexer,
                       index_q=q, index_w=w, index_keys=index_keys, wants_loss=wants_loss)
