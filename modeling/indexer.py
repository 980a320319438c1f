"""DeepSeek Sparse Attention's lightning indexer (V3.2, spec §1.2) and deterministic top-k selection.

Score of key s for query t:  I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]) · d^-1/2,  w = W_w h_t · H^-1/2,
with one shared LayerNorm'd index key per token and non-interleaved RoPE on the first `rope_dim` dims
of q and k (the 2025-11-17 fix of the official demo). The Hadamard rotation + FP8 rounding of the
official kernel leave q·k unchanged in exact arithmetic and are not simulated here.

Selection is causal top-k with a fixed tie rule: among equal scores the later position wins. ReLU makes
exact ties common (all heads zero), and `torch.topk` resolves ties by memory layout, so without a
rule cached and uncached runs would pick different keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope
from .sparse_attention import gather_rows, query_chunk


def deterministic_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest float32 scores along the last dim; ties -> larger index first.

    Fast path: a plain top-k. Only rows where the k-th value is tied with an unselected entry (a finite one:
    -inf entries are never attended) are recomputed with an exact composite key (score bits, position).
    """
    top = torch.topk(scores, k, dim=-1)
    kth = top.values[..., -1:]
    ambiguous = ((scores >= kth).sum(-1) > k) & torch.isfinite(kth[..., 0])
    if not ambiguous.any():
        return top.indices
    rows = scores[ambiguous]
    bits = (rows.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # int order == float order
    positions = torch.arange(scores.shape[-1], device=scores.device)
    indices = top.indices.clone()
    indices[ambiguous] = torch.topk(ordered * 2**32 + positions, k, dim=-1).indices
    return indices


def causal_valid(q_positions: torch.Tensor, num_keys: int, key_padding: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, L, T] bool: key s is visible to the query at cache index q (s <= q) and is not padding."""
    valid = torch.arange(num_keys, device=q_positions.device) <= q_positions[..., None]  # [1, L, T]
    if key_padding is not None:
        pad = key_padding[:, :num_keys]
        if pad.shape[1] < num_keys:  # static caches are longer than the mask; slots past it are not causal anyway
            pad = F.pad(pad, (0, num_keys - pad.shape[1]), value=False)
        valid = valid & pad[:, None, :]
    return valid


class LightningIndexer(nn.Module):
    def __init__(self, config, q_input_dim: int):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim, self.topk = config.index_rope_head_dim, config.index_topk
        self.wq_b = nn.Linear(q_input_dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5

    def _rope(self, x, cos, sin):
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((apply_rope(rot, cos, sin, interleaved=False), rest), dim=-1)

    def keys(self, hidden: torch.Tensor, cos, sin) -> torch.Tensor:
        """hidden [B, S, H] -> index keys [B, S, D]."""
        k = self.k_norm(self.wk(hidden))
        return self._rope(k.unsqueeze(1), cos, sin).squeeze(1)

    def queries(self, hidden: torch.Tensor, q_input: torch.Tensor, cos, sin):
        """-> q [B, L, Hi, D] and per-head weights [B, L, Hi] (float32, scales folded in)."""
        b, l, _ = hidden.shape
        q = self.wq_b(q_input).view(b, l, self.n_heads, self.head_dim).transpose(1, 2)
        q = self._rope(q, cos, sin).transpose(1, 2)
        w = self.weights_proj(hidden).float() * (self.n_heads**-0.5 * self.softmax_scale)
        return q, w

    @staticmethod
    def score(q, w, keys) -> torch.Tensor:
        """q [B, L, Hi, D], w [B, L, Hi], keys [B, T, D] -> I [B, L, T] (float32).

        Heads outermost ([B, Hi, L, T]): the matmul writes its output contiguously and ReLU runs in place.
        This is the quadratic part of DSA, so every pass over L·T counts (2.5x faster than head-inner einsums).
        """
        relu = torch.matmul(q.float().transpose(1, 2), keys.float().transpose(1, 2).unsqueeze(1)).relu_()
        return torch.einsum("blh,bhlt->blt", w, relu)

    @staticmethod
    def score_selected(q, w, keys, idx) -> torch.Tensor:
        """Scores only at idx [B, L, k] -> [B, L, k]: O(L·k), used for the sparse-mode loss."""
        sel = gather_rows(keys, idx).float()  # [B, L, k, D]
        relu = F.relu(torch.einsum("blhd,blkd->blhk", q.float(), sel))
        return torch.einsum("blh,blhk->blk", w, relu)

    @torch.no_grad()
    def select(self, q, w, keys, q_positions, key_padding) -> torch.Tensor:
        """Top-k visible keys per query -> idx [B, L, k] (-1 where fewer than k keys are visible).

        Queries are chunked and each chunk only scores the keys up to its last position, so memory
        stays O(chunk·T) and causal work is halved.
        """
        b, l = q.shape[:2]
        k = min(self.topk, keys.shape[1])
        step = query_chunk(l, 4 * keys.shape[1] * (self.n_heads + 4))
        out = []
        for start in range(0, l, step):
            pos = q_positions[:, start : start + step]
            # keys beyond the chunk's last query are never visible; rounding the width up to a multiple of 4096
            # keeps the number of distinct buffer sizes small, so the allocator reuses them instead of fragmenting
            t = min(keys.shape[1], -(-(int(pos.max()) + 1) // 4096) * 4096)
            scores = self.score(q[:, start : start + step], w[:, start : start + step], keys[:, :t])
            valid = causal_valid(pos, t, key_padding)
            scores = scores.masked_fill(~valid, float("-inf"))
            kk = min(k, t)
            top = deterministic_topk(scores, kk)
            top = torch.where(valid.expand_as(scores).gather(-1, top), top, -1)
            if kk < k:
                top = F.pad(top, (0, k - kk), value=-1)
            out.append(top)
        return torch.cat(out, dim=1)
