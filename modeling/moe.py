"""FFN kinds: `dense` (SwiGLU), `moe` (shared + routed experts, learned router) and `hash_moe`.

Routing (scores, groups, balancing bias, hash table) is kept apart from expert compute: `Experts` takes
per-token expert ids and weights from any router and runs them grouped by expert over 3-D weights.
Every FFN kind has the interface `forward(hidden [B, S, H], input_ids [B, S] | None) -> (out, RouterAux | None)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float | None) -> torch.Tensor:
    """SiLU(gate) * up; V4 clamps gate <= limit and up to [-limit, limit] (V4 `Expert`)."""
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class DenseFFN(nn.Module):
    kind = "dense"

    def __init__(self, config, intermediate_size: int | None = None):
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.swiglu_limit = config.swiglu_limit
        self.gate_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, inter, bias=False)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, hidden_states, input_ids=None):
        gated = swiglu(self.gate_proj(hidden_states), self.up_proj(hidden_states), self.swiglu_limit)
        return self.down_proj(gated), None


# ---- routing -------------------------------------------------------------------------------------

@dataclass
class RouterAux:
    router_logits: torch.Tensor  # [N, E] raw gate logits (float32)
    aux_loss: torch.Tensor | None  # sequence-wise balance loss, already scaled by aux_loss_alpha


def balanced_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """Seeded token-id -> top_k distinct experts table [V, k] in which every expert gets V·k/E ± 1 rows.

    Token t gets experts perm[(r_t + j) mod E] for j < k, with r_t a random rank taken mod E (the released tables'
    construction is unknown, docs/decisions.md#d5-hash-routing-table).
    """
    g = torch.Generator().manual_seed(seed)
    rank = torch.empty(vocab_size, dtype=torch.long)
    rank[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size)
    perm = torch.randperm(num_experts, generator=g)
    slots = (rank[:, None] + torch.arange(top_k)) % num_experts
    return perm[slots]


class Gate(nn.Module):
    """What every router shares: the gate weight and its scores s = f(x W^T), which weight the chosen experts
    (renormalised over them when `norm_topk_prob`, times `routed_scaling_factor`). Subclasses choose the experts."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.scoring_func, self.norm_topk_prob = config.scoring_func, config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "softmax":
            return logits.softmax(dim=-1)
        if self.scoring_func == "sigmoid":
            return logits.sigmoid()
        return F.softplus(logits).sqrt()  # "sqrtsoftplus" (DeepSeek-V4)

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, batch_shape: tuple[int, int]):
        """x [N, H] -> (weights [N, k], indices [N, k], RouterAux)."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = self.score(logits)
        indices = self.select(scores, input_ids)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return weights.to(x.dtype), indices, RouterAux(logits, self.balance(scores, indices, batch_shape))

    def balance(self, scores, indices, batch_shape) -> torch.Tensor | None:
        """Training-time balancing bookkeeping; returns the auxiliary loss, if any."""
        return None


class Router(Gate):
    """Learned top-k router with DeepSeek-V3 group-limited selection and an aux-loss-free balancing bias.

    The bias `e_score_correction_bias` shifts scores for *selection* only; the weights come from the
    unbiased scores. `update_bias()` applies V3's rule b_i <- b_i - rate * sign(load_i - mean load) using
    the loads counted over the training forwards since the last update.
    """

    def __init__(self, config):
        super().__init__(config)
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.bias_update_rate, self.aux_loss_alpha = config.router_bias_update_rate, config.aux_loss_alpha
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(self.num_experts, dtype=torch.float32), persistent=False)

    def select(self, scores: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        biased = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = biased.view(-1, self.n_group, self.num_experts // self.n_group)
            # V3 rule: a group's score is the sum of its two best experts (its best one if it has only one)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [N, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            biased = biased.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        return biased.topk(self.top_k, dim=-1).indices

    def balance(self, scores, indices, batch_shape) -> torch.Tensor | None:
        if not self.training:
            return None
        with torch.no_grad():
            self.expert_load += torch.bincount(indices.flatten(), minlength=self.num_experts).float()
        return self.sequence_balance_loss(scores, indices, batch_shape) if self.aux_loss_alpha > 0 else None

    def sequence_balance_loss(self, scores, indices, batch_shape) -> torch.Tensor:
        """V3 sequence-wise balance loss α·Σ_i f_i·P_i, averaged over sequences (padding included)."""
        b, s = batch_shape
        e, k = self.num_experts, self.top_k
        chosen = torch.zeros_like(scores).scatter_(1, indices, 1.0).view(b, s, e)
        f = chosen.sum(1) * e / (k * s)  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(b, s, e).mean(1)  # [B, E]
        return self.aux_loss_alpha * (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Apply the aux-loss-free bias update from the loads counted since the last call; returns the loads."""
        load = self.expert_load.clone()
        if load.sum() > 0:
            self.e_score_correction_bias -= self.bias_update_rate * torch.sign(load - load.mean())
        self.expert_load.zero_()
        return load


class HashRouter(Gate):
    """`hash_moe`: experts are a frozen function of the token id (`tid2eid`, [V, k]); routing is fixed, so there is
    no balancing bias, load count or balance loss.

    The gate still scores experts, and those scores weight the hashed choices (DeepSeek-V4 hash layers).
    """

    def __init__(self, config):
        super().__init__(config)
        self.seed, self.vocab_size = config.hash_moe_seed, config.vocab_size
        self.register_buffer("tid2eid", self.default_table(self.vocab_size))

    def default_table(self, vocab_size: int) -> torch.Tensor:
        return balanced_hash_table(vocab_size, self.num_experts, self.top_k, self.seed)

    def select(self, scores, input_ids):
        if input_ids is None:
            raise ValueError("`hash_moe` layers route by token id: call the model with `input_ids`, not only "
                             "`inputs_embeds`.")
        return self.tid2eid[input_ids.reshape(-1)].long()

    @torch.no_grad()
    def resize(self, vocab_size: int):
        """Keep routing of existing ids; new ids get rows of a table seeded for the new size."""
        table = self.default_table(vocab_size).to(self.tid2eid.device, self.tid2eid.dtype)
        n = min(vocab_size, self.tid2eid.shape[0])
        table[:n] = self.tid2eid[:n]
        self.tid2eid = table
        self.vocab_size = vocab_size


# ---- expert compute ------------------------------------------------------------------------------

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (CPU grouped_mm backward requires it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by expert, `counts[e]` rows for expert e: row @ weight[e].T -> [N, out]."""
    if x.dtype in (torch.float32, torch.bfloat16, torch.float16) and hasattr(F, "grouped_mm"):
        offsets = counts.cumsum(0).to(torch.int32)
        return _ContiguousGrad.apply(F.grouped_mm(x, weight.transpose(1, 2), offs=offsets))
    # other dtypes (float64 reference runs): one matmul per contiguous expert segment
    pieces = [seg @ weight[e].T for e, seg in enumerate(x.split(counts.tolist())) if seg.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, weight.shape[1])


class Experts(nn.Module):
    """Routed experts as 3-D parameters: gate_up_proj [E, 2I, H], down_proj [E, H, I] (Mixtral/HF layout)."""

    def __init__(self, config):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.swiglu_limit = e, config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], indices/weights [N, k] -> [N, H]; token copies are sorted by expert, then segmented."""
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        gate, up = grouped_linear(x[token], self.gate_up_proj, counts).chunk(2, dim=-1)
        y = grouped_linear(swiglu(gate, up, self.swiglu_limit), self.down_proj, counts)
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


class MoE(nn.Module):
    """Shared experts (always on) + routed experts picked by a `Router` (`moe`) or `HashRouter` (`hash_moe`)."""

    def __init__(self, config, hashed: bool = False):
        super().__init__()
        self.kind = "hash_moe" if hashed else "moe"
        self.gate = HashRouter(config) if hashed else Router(config)
        self.experts = Experts(config)
        shared = config.moe_intermediate_size * config.n_shared_experts
        self.shared_experts = DenseFFN(config, shared) if config.n_shared_experts else None

    def forward(self, hidden_states, input_ids=None):
        b, s, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        weights, indices, aux = self.gate(x, input_ids, (b, s))
        out = self.experts(x, indices, weights).view(b, s, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)[0]
        return out, aux
