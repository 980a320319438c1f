"""Slow, obviously-correct re-computations that tests compare the library's fast paths against."""
from __future__ import annotations

import torch

from seekv4.modeling.moe import swiglu


def experts_loop_reference(experts, x, indices, weights) -> torch.Tensor:
    """Every expert over every token, masked by the routing: O(N·E) compute."""
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        y = swiglu(gate, up, experts.swiglu_limit) @ experts.down_proj[e].T
        w = (weights * (indices == e)).sum(-1, keepdim=True)
        out = out + w * y
    return out


def sparse_attention_reference(queries, keys, value, idx, scaling, sink=None):
    """Dense scores over all T keys, masked to each query's index set (float64-capable)."""
    b, l, g, hg, _ = queries[0].shape
    t = keys[0].shape[1]
    scores = sum(torch.einsum("blghd,btgd->blght", q, kx.unflatten(-1, (g, -1))) for q, kx in zip(queries, keys))
    allowed = torch.zeros(b, l, t + 1, dtype=torch.bool, device=idx.device)
    allowed.scatter_(2, torch.where(idx < 0, t, idx), True)
    scores = (scores * scaling).masked_fill(~allowed[:, :, None, None, :t], float("-inf"))
    if sink is not None:
        scores = torch.cat((scores, sink.to(scores.dtype).view(1, 1, g, hg, 1).expand(b, l, g, hg, 1)), dim=-1)
    probs = torch.softmax(scores, dim=-1)[..., :t]
    v = keys[value] if isinstance(value, int) else value
    return torch.einsum("blght,btgd->blghd", probs, v.unflatten(-1, (g, -1)))


def composite_gain(mixes: list[torch.Tensor]) -> torch.Tensor:
    """mHC paper's 'Amax gain': for the product of the per-site mixing matrices (as applied, X' = Mᵀ X),
    max(max abs row sum, max abs column sum), per token. mixes: list of [..., n, n] -> [...]."""
    total = None
    for m in mixes:
        m = m.double().transpose(-1, -2)
        total = m if total is None else m @ total
    rows = total.abs().sum(-1).amax(-1)
    cols = total.abs().sum(-2).amax(-1)
    return torch.maximum(rows, cols)
