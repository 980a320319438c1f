"""DeepSeek Sparse Attention's lightning indexer (V3.2, spec §1.2) and deterministic top-k selection.

Score of key s for query t:  I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]) · d^-1/2,  w = W_w h_t · H^-1/2,
with one shared LayerNorm'd index key per token and non-interleaved RoPE on the first `rope_dim` dims
of q and k (the 2025-11-17 fix of the official demo). The Hadamard rotation + FP8 rounding of the
official kernel leave q·k unchanged in exact arithmetic and are not simulated here. That is this module's
("eager") float32 path; `config.indexer_implementation = "fused"` hands selection to the compiled CPU kernel in
`indexer_kernel.py`, which rounds q and k to bf16 (coarser FP8 in the official kernel) and never builds the
[L, T] score matrix: the same picks up to reordered near-ties, several times faster at long context.

Selection is causal top-k with a fixed tie rule: among equal scores the later position wins. ReLU makes
exact ties common (all heads zero), and `torch.topk` resolves ties by memory layout, so without a
rule cached and uncached runs would pick different keys.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .indexer_kernel import fused_topk
from .rope import apply_rope
from .workspace import reusable_buffer
from .sparse_attention import gather_rows, query_chunk


def deterministic_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest float32 scores along the last dim; ties -> larger index first.

    Long rows go through `_blocked_topk` (exact, prunes to candidate blocks first). Fast path: one
    top-(k+1). A row is ambiguous only when its k-th and (k+1)-th values v are equal (and finite: -inf
    entries are never attended). Such a row keeps its c entries > v (all of them are in the top-k) and takes
    the k - c latest positions whose score == v, found by a second top-k over positions. Random or barely
    trained indexers hit this often (a row whose head weights are all negative scores 0 for every key with
    all heads below zero), so it must stay cheap: one compare and one top-k, no int64 keys.
    """
    n = scores.shape[-1]
    if k >= n:  # everything is selected: no boundary to break ties at
        return torch.topk(scores, k, dim=-1).indices
    if n >= 64 * k and n >= 4096:
        return _blocked_topk(scores, k)
    return _direct_topk(scores, k)


def _direct_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """k < n; see `deterministic_topk`."""
    top = torch.topk(scores, k + 1, dim=-1)
    v, after = top.values[..., k - 1], top.values[..., k]
    ambiguous = (v == after) & torch.isfinite(v)
    indices = top.indices[..., :k]
    if not ambiguous.any():
        return indices
    indices = indices.clone()
    indices[ambiguous] = _with_latest_ties(scores[ambiguous], top.values[ambiguous][:, :k], indices[ambiguous],
                                           v[ambiguous, None])
    return indices


def _with_latest_ties(rows, values, indices, v):
    """rows [R, n] whose k-th largest value v [R, 1] is tied beyond the k selected (values/indices [R, k]):
    keep the c < k entries > v (all of them are selected) and fill the rest with the latest positions == v."""
    k = indices.shape[-1]
    greater = values > v
    c = greater.sum(-1, keepdim=True)
    first = indices.gather(-1, torch.argsort((~greater).to(torch.uint8), dim=-1, stable=True))  # > v first
    latest = _latest_positions(rows == v, k)  # at least k - c + 1 of them exist
    j = torch.arange(k, device=rows.device)
    return torch.where(j < c, first, latest.gather(-1, (j - c).clamp(min=0)))


def _latest_positions(mask: torch.Tensor, k: int) -> torch.Tensor:
    """[R, n] bool -> the k largest positions where mask is True, latest first (callers ensure >= k exist)."""
    n = mask.shape[-1]
    pos = torch.where(mask, torch.arange(n, device=mask.device, dtype=torch.float32), -1.0)  # exact to 2^24
    if n < 64 * k or n < 4096:
        return torch.topk(pos, k, dim=-1).indices
    # positions are distinct, so block pruning is always exact: the k latest matches lie in the k latest
    # blocks that have a match (when fewer blocks match, all of them are among those k)
    starts, cand = _candidate_blocks(pos, k, _block_size(n, k))[2:]
    return torch.gather(starts, -1, torch.topk(cand, k, dim=-1).indices)


def _block_size(n: int, k: int) -> int:
    return max(16, 1 << round(math.log2(math.sqrt(n / k))))  # ~sqrt(n/k): block maxima and candidates balance


def _candidate_blocks(scores, k, block):
    """-> (block maxima [.., nb], the k-th largest of them [..], candidate positions [.., k·block] in position
    order, candidate scores) for the k blocks with the largest maxima; positions past the row end read -inf."""
    n = scores.shape[-1]
    full = n // block
    bmax = scores[..., : full * block].unflatten(-1, (full, block)).amax(-1)
    if full * block < n:
        bmax = torch.cat((bmax, scores[..., full * block :].amax(-1, keepdim=True)), dim=-1)
    top = torch.topk(bmax, k, dim=-1)
    start = top.indices.sort(dim=-1).values * block
    positions = (start[..., None] + torch.arange(block, device=scores.device)).flatten(-2)  # [..., k·block]
    cand = scores.gather(-1, positions.clamp(max=n - 1)).masked_fill_(positions >= n, float("-inf"))
    return bmax, top.values[..., -1], positions, cand


def _blocked_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`deterministic_topk` for long rows, exact: a max over blocks is a cheap vectorised pass, torch.topk over
    every element is not. With τ = the k-th largest block maximum, at least k entries are >= τ, so the k-th
    largest value v is >= τ and every entry > τ lies in one of the k blocks with the largest maxima: the top-k of
    those candidates (gathered in position order, so the tie rule carries over) has the true v and every entry > v.
    Only when v == τ and more than k blocks reach τ can entries == v lie outside the candidates; those rows
    (ties, e.g. ReLU zeros) keep their entries > v and take the latest positions == v over the whole row."""
    n = scores.shape[-1]
    bmax, tau, positions, cand = _candidate_blocks(scores, k, _block_size(n, k))
    local = _direct_topk(cand, k)
    indices = positions.gather(-1, local)
    values = cand.gather(-1, local)
    v = values.amin(-1)
    outside = (v == tau) & torch.isfinite(tau) & ((bmax >= tau[..., None]).sum(-1) > k)
    if outside.any():
        indices[outside] = _with_latest_ties(scores[outside], values[outside], indices[outside], v[outside, None])
    return indices


@torch.no_grad()
def relu_weighted_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                         scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Selection scores without autograd: q [B, L, Hi, D], w [B, L, Hi], keys [B, T, D] -> [B, L, T] float32.

    This is DSA's quadratic part: the matmul is compute-bound (about half of selection, `bench/indexer_costs.py`),
    everything after it memory-bound, so it is written as few passes over [L, Hi, T] as plain
    torch allows: one batched matmul straight into a reused buffer (fresh multi-MB tensors cost more in page
    faults than the matmul itself), ReLU in place, then the head-weighted sum as one batched [1, Hi] x [Hi, T]
    matmul per query, which reads every head once and writes the output once (instead of one multiply-add
    pass per head). `scratch` (float32, >= (Hi + 1)·B·L·T elements) is reused across query chunks; the result
    is a view into it.
    """
    b, l, hi, d = q.shape
    t = keys.shape[1]
    need = (hi + 1) * b * l * t
    if scratch is None or scratch.numel() < need:
        scratch = reusable_buffer(need, torch.float32, q.device)
    heads = scratch[: hi * b * l * t].view(b, l * hi, t)  # query-major: the Hi rows of a query are adjacent
    out = scratch[hi * b * l * t : need].view(b * l, 1, t)
    torch.bmm(q.float().reshape(b, l * hi, d), keys.float().transpose(1, 2), out=heads)
    heads.relu_()
    torch.bmm(w.float().reshape(b * l, 1, hi), heads.view(b * l, hi, t), out=out)  # Σ_h w_h·ReLU(·): one pass
    return out.view(b, l, t)


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
        self.config = config  # read at call time: `indexer_implementation` may be switched on a loaded model
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

        Queries are chunked and each chunk only scores the keys up to its last position, so memory stays
        O(chunk·T) and causal work is halved. One scratch buffer serves every chunk. Only the keys at or
        after the chunk's first query position can be invisible (causality), so only that slab is masked,
        unless padding hides keys anywhere.
        """
        b, l = q.shape[:2]
        num_keys = keys.shape[1]
        k = min(self.topk, num_keys)
        pad = None
        if key_padding is not None and not bool(key_padding[:, :num_keys].all()):
            pad = key_padding[:, :num_keys]
        if self.config.indexer_implementation == "fused":
            return fused_topk(q, w, keys, q_positions, pad, k)
        step = query_chunk(l, 4 * num_keys * (self.n_heads + 1) * b)
        scratch = reusable_buffer((self.n_heads + 1) * b * min(step, l) * num_keys, torch.float32, q.device)
        out = []
        for start in range(0, l, step):
            pos = q_positions[:, start : start + step]  # [B or 1, Lc] cache indices
            t = min(num_keys, int(pos.max()) + 1)  # keys beyond the chunk's last query are never visible
            scores = relu_weighted_scores(q[:, start : start + step], w[:, start : start + step], keys[:, :t],
                                          scratch)
            first = max(0, min(int(pos.min()), t))
            if first < t:
                slab = torch.arange(first, t, device=q.device) > pos[..., None]  # [B or 1, Lc, t - first]
                scores[..., first:].masked_fill_(slab, float("-inf"))
            if pad is not None:
                scores.masked_fill_(~pad[:, None, :t], float("-inf"))
            kk = min(k, t)
            top = deterministic_topk(scores, kk)
            visible = top <= pos[..., None]
            if pad is not None:
                visible &= pad.gather(1, top.flatten(1)).view_as(top)
            top = torch.where(visible, top, -1)
            if kk < k:
                top = F.pad(top, (0, k - kk), value=-1)
            out.append(top)
        return torch.cat(out, dim=1)
