"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2) and deterministic causal top-k selection.

Score of key s for query t:  I[t, s] = Σ_j w[t, j] · ReLU(q[t, j] · k[s]),  w = W_w h_t · H^-1/2 · d^-1/2,
with one shared LayerNorm'd index key per token and non-interleaved RoPE on the first `rope_dim` dims
of q and k (the 2025-11-17 fix of the official demo). The Hadamard rotation + FP8 rounding of the
official kernel leave q·k unchanged in exact arithmetic and are not simulated here.

This module holds the one scorer (`index_scores`), the one weight scale (`head_weights`) and the one selection
(`select_topk`) that both DSA (`LightningIndexer`, keys = index keys of the tokens) and V4's CSA
(`attention_v4.V4Indexer`, keys = compressed index entries) use. Visibility has one convention: query l sees
the keys s < limit[l] (DSA: its cache index + 1; CSA: its number of complete entries), padding excepted.

`config.indexer_implementation` picks how `select_topk` runs:
  * "eager": float32 torch ops (the transformers ports' numerics; the parity tests pin it). Streamed by query
    chunks within `sparse_attention.CHUNK_BUDGET_BYTES`: score a chunk against the keys below its largest limit
    (causal: later keys are never visible), top-k it, next chunk; the [L, T] score matrix never exists.
  * "fused": the compiled CPU kernel of `indexer_kernel.py`, which rounds q and k to bf16 (coarser FP8 in the
    official kernel), accumulates in float32 and keeps a running top-k per query: several times faster at long
    context. Its picks equal the eager ones except where bf16 rounding reorders near-equal scores
    (`python bench/indexer_costs.py` prints the overlap: 99.5% of the eager picks at its 32k shape).
  * "auto" (the default): "fused" for CPU tensors when the kernel builds, else "eager". A kernel that cannot be
    built is logged once (warning) and auto runs eager; accelerators run eager (the kernel is CPU-only).

Selection is causal top-k with a fixed tie rule: among equal scores the later position wins. ReLU makes
exact ties common (all heads zero), and `torch.topk` resolves ties by memory layout, so without a
rule cached and uncached runs would pick different keys.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import indexer_kernel
from .rope import apply_rope
from .sparse_attention import gather_rows, query_chunk
from .workspace import reusable_buffer


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


def head_weights(logits: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """weights_proj(h) [B, L, Hi] -> the per-head score weights w (float32) with both scales folded in: H^-1/2
    averages the heads, d^-1/2 is the dot product's softmax scale (applied to w, as ReLU commutes with it)."""
    return logits.float() * (n_heads**-0.5 * head_dim**-0.5)


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, idx: torch.Tensor | None = None,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """I = Σ_h w_h·ReLU(q_h·k) in float32: q [B, L, Hi, D], w [B, L, Hi], keys [B, T, D] -> [B, L, T], or only
    at idx [B, L, k] (key positions, -1 read as 0) -> [B, L, k] (the selected keys, for the sparse-mode loss).

    Differentiable (the indexer's KL trains through it), except with `scratch` (float32, >= (Hi + 1)·B·L·T
    elements, reused across the eager selection's query chunks; the result is then a view into it): fresh
    multi-MB tensors cost more in page faults than the matmul itself. This is DSA's quadratic part, so it is
    few passes over [L, Hi, T]: one batched matmul, ReLU in place, then the head-weighted sum as one batched
    [1, Hi] x [Hi, T] matmul per query, which reads every head once and writes the output once.
    """
    b, l, hi, d = q.shape
    if idx is None:  # keys shared by every query: one [L·Hi, D] x [D, T] matmul per sample
        t = keys.shape[1]
        lhs, rhs = q.float().reshape(b, l * hi, d), keys.float().transpose(1, 2)
    else:  # each query's own keys: one [Hi, D] x [D, k] matmul per query
        t = idx.shape[-1]
        lhs = q.float().reshape(b * l, hi, d)
        rhs = gather_rows(keys, idx).float().reshape(b * l, t, d).transpose(1, 2)
    weights = w.float().reshape(b * l, 1, hi)
    if scratch is None:
        heads = torch.bmm(lhs, rhs).relu_()
        return torch.bmm(weights, heads.view(b * l, hi, t)).view(b, l, t)
    need = (hi + 1) * b * l * t
    if scratch.numel() < need:
        scratch = reusable_buffer(need, torch.float32, q.device)
    heads = scratch[: hi * b * l * t].view(lhs.shape[0], lhs.shape[1], t)  # query-major: a query's Hi rows adjacent
    out = scratch[hi * b * l * t : need].view(b * l, 1, t)
    torch.bmm(lhs, rhs, out=heads)
    heads.relu_()
    torch.bmm(weights, heads.view(b * l, hi, t), out=out)  # Σ_h w_h·ReLU(·): one pass
    return out.view(b, l, t)


def visible_keys(limit: torch.Tensor, num_keys: int, key_padding: torch.Tensor | None) -> torch.Tensor:
    """[B or 1, L, T] bool: key s is visible to query l (s < limit[l]) and is not padding."""
    valid = torch.arange(num_keys, device=limit.device) < limit[..., None]  # [B or 1, L, T]
    if key_padding is not None:
        pad = key_padding[:, :num_keys]
        if pad.shape[1] < num_keys:  # static caches are longer than the mask; slots past it are not causal anyway
            pad = nn.functional.pad(pad, (0, num_keys - pad.shape[1]), value=False)
        valid = valid & pad[:, None, :]
    return valid


def resolve_implementation(implementation: str, device: torch.device) -> str:
    """config.indexer_implementation -> "eager" or "fused" for tensors on `device` (see the module docstring)."""
    if implementation != "auto":
        return implementation
    if device.type != "cpu":
        return "eager"
    return "fused" if indexer_kernel.available() else "eager"


@torch.no_grad()
def select_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, limit: torch.Tensor, k: int,
                implementation: str = "eager", key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """The k best visible keys of each query -> idx [B, L, k] int64, best first, -1 where fewer than k keys are
    visible; which of several equal scores are kept follows the tie rule (the later key wins).

    q [B, L, Hi, D], w [B, L, Hi] (`head_weights`), keys [B, T, D], limit [B or 1, L]: query l sees the keys
    s < limit[l]; key_padding [B, >= T] bool (True = real token) or None. `implementation`: see the module
    docstring ("auto" | "eager" | "fused").
    """
    num_keys = keys.shape[1]
    pad = None
    if key_padding is not None and not bool(key_padding[:, :num_keys].all()):
        pad = key_padding[:, :num_keys]
    if resolve_implementation(implementation, q.device) == "fused":
        return indexer_kernel.fused_topk(q, w, keys, limit, pad, k)
    return _eager_topk(q, w, keys, limit, k, pad)


def _eager_topk(q, w, keys, limit, k, pad):
    """`select_topk` in float32 torch ops, by query chunks within the memory budget. A chunk scores only the keys
    below its largest limit (over a causal prefill this halves the work), and only the columns at or past its
    smallest limit can be invisible, so only that slab is masked, unless padding hides keys anywhere."""
    b, l, hi, _ = q.shape
    num_keys = keys.shape[1]
    out = torch.full((b, l, k), -1, dtype=torch.long, device=q.device)
    if l == 0 or k == 0 or num_keys == 0:
        return out
    step = query_chunk(l, 4 * num_keys * (hi + 1) * b)
    scratch = reusable_buffer((hi + 1) * b * step * num_keys, torch.float32, q.device)
    for start in range(0, l, step):
        rows = slice(start, start + step)
        lim = limit[:, rows]  # [B or 1, Lc]
        t = min(num_keys, int(lim.max()))
        kk = min(k, t)
        if kk <= 0:
            continue  # no query of the chunk sees a key yet
        scores = index_scores(q[:, rows], w[:, rows], keys[:, :t], scratch=scratch)
        first = max(0, min(int(lim.min()), t))
        if first < t:
            hidden = torch.arange(first, t, device=q.device) >= lim[..., None]  # [B or 1, Lc, t - first]
            scores[..., first:].masked_fill_(hidden, float("-inf"))
        if pad is not None:
            scores.masked_fill_(~pad[:, None, :t], float("-inf"))
        top = deterministic_topk(scores, kk)
        visible = top < lim[..., None]
        if pad is not None:
            visible &= pad.gather(1, top.flatten(1)).view_as(top)
        out[:, rows, :kk] = torch.where(visible, top, -1)
    return out


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
        return q, head_weights(self.weights_proj(hidden), self.n_heads, self.head_dim)

    def select(self, q, w, keys, limit, key_padding=None) -> torch.Tensor:
        """Top-`index_topk` visible keys per query (at most T) -> idx [B, L, min(k, T)]; see `select_topk`."""
        return select_topk(q, w, keys, limit, min(self.topk, keys.shape[1]), self.config.indexer_implementation,
                           key_padding)
