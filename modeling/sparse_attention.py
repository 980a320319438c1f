"""Sparse attention kernel: each query attends only to its own set of key indices.

Keys/values are shared by groups of heads (MQA/GQA; MLA in its absorbed form is MQA over the latent).
Queries are processed in chunks sized so the gathered keys and the scores stay within a fixed memory
budget, so memory is O(L·k) and time O(L·k·D) — never O(L·T).
"""
from __future__ import annotations

import torch

# gathered keys + scores per query chunk. Kept well under glibc's 32 MiB mmap threshold: larger temporaries are
# fresh mappings every chunk, whose page faults can cost more than the gathers
CHUNK_BUDGET_BYTES = 16 * 2**20


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, D], idx [B, L, k] (entries < 0 allowed, read as row 0) -> [B, L, k, D].

    Row copies per sample (`index_select`), not `gather`: gather reads an int64 index per element and is slower
    here, where every prefill query gathers k rows."""
    b, l, k = idx.shape
    if x.shape[1] == 0:  # e.g. no compressed entry is complete yet: every index must be -1 (masked)
        if (idx >= 0).any():
            raise ValueError(f"gather_rows: indices up to {int(idx.max())} into a tensor with no rows")
        return x.new_zeros(b, l, k, x.shape[-1])
    flat = idx.clamp(min=0).reshape(b, l * k)
    rows = [x[i].index_select(0, flat[i]) for i in range(b)]  # x[i] is a view: the cache is never copied
    return (rows[0][None] if b == 1 else torch.stack(rows)).view(b, l, k, x.shape[-1])


def query_chunk(num_queries: int, per_query_bytes: int) -> int:
    return max(1, min(num_queries, CHUNK_BUDGET_BYTES // max(per_query_bytes, 1)))


def sparse_attention(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    value: int | torch.Tensor,
    idx: torch.Tensor,
    scaling: float,
    return_probs: bool = False,
    sink: torch.Tensor | None = None,
    dense: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Attention of each query over the keys it selected (plus, optionally, a dense block of keys).

    queries[i] [B, L, G, Hg, d_i] pair with keys[i] [B, T, G·d_i] (G shared-key groups, Hg heads each):
    score = Σ_i q_i·k_i. `value` is a [B, T, G·d_v] tensor, or an int naming one of `keys` (MLA's latent is
    then gathered once, as key and as value).
    idx [B, L, k]: key positions per query, -1 = no key (masked).
    sink [G·Hg]: optional per-head logit added to the softmax denominator only (an attention sink whose
    value is zero, DeepSeek-V4).
    dense = (rows [B, N, G·d], visible [B, L, N]): K=V rows every query may see (masked per query) that join the
    same softmax through one matmul per chunk instead of a gather per query: HCA's compressed entries, which each
    query attends to densely (gathering N rows per query is O(L·N·d) memory traffic; the matmul reads them once
    per chunk). Only for K=V attention: `keys` is one tensor and `value` is 0.
    Returns out [B, L, G, Hg, d_value] and, if asked, probabilities [B, L, G, Hg, k (+ N)] (float32 or wider).
    """
    b, l, g, hg, _ = queries[0].shape
    k = idx.shape[-1]
    d_total = sum(x.shape[-1] for x in keys) + (0 if isinstance(value, int) else value.shape[-1])
    per_query = 4 * k * (d_total + 3 * g * hg)
    if dense is not None:
        if len(keys) != 1 or not (isinstance(value, int) and value == 0):
            raise ValueError("sparse_attention: `dense` keys need K=V attention (one key tensor, value=0)")
        dense_rows = dense[0].unflatten(-1, (g, -1))  # [B, N, G, d]
        per_query += 4 * dense_rows.shape[1] * 3 * g * hg
    step = query_chunk(l, per_query)
    outs, probs_all = [], []
    for start in range(0, l, step):
        sl = slice(start, start + step)
        sel = idx[:, sl]  # [B, Lc, k]
        gathered = [gather_rows(x, sel).unflatten(-1, (g, -1)) for x in keys]  # [B, Lc, k, G, d_i]
        scores = sum(torch.einsum("blghd,blkgd->blghk", q[:, sl], kx) for q, kx in zip(queries, gathered))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling  # softmax in >= fp32
        scores = scores.masked_fill((sel < 0)[:, :, None, None, :], torch.finfo(scores.dtype).min)
        if dense is not None:
            extra = torch.einsum("blghd,bngd->blghn", queries[0][:, sl], dense_rows).to(scores.dtype) * scaling
            extra = extra.masked_fill(~dense[1][:, sl, None, None, :], torch.finfo(scores.dtype).min)
            scores = torch.cat((scores, extra), dim=-1)
        if sink is None:
            probs = torch.softmax(scores, dim=-1)
        else:
            sink_logits = sink.to(scores.dtype).view(1, 1, g, hg, 1).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat((scores, sink_logits), dim=-1), dim=-1)[..., :-1]
        v = gathered[value] if isinstance(value, int) else gather_rows(value, sel).unflatten(-1, (g, -1))
        out = torch.einsum("blghk,blkgd->blghd", probs[..., :k].to(v.dtype), v)
        if dense is not None:
            out = out + torch.einsum("blghn,bngd->blghd", probs[..., k:].to(v.dtype), dense_rows)
        outs.append(out)
        if return_probs:
            probs_all.append(probs)
    out = torch.cat(outs, dim=1)
    return (out, torch.cat(probs_all, dim=1)) if return_probs else (out, None)

