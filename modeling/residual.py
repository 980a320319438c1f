"""Residual kinds: `plain`, `hc` (Hyper-Connections, arXiv 2409.19606) and `mhc` (Manifold-Constrained
Hyper-Connections, arXiv 2512.24880, in DeepSeek-V4's released form, docs/residual.md).

The residual state between sublayers is a stack of n streams `[B, S, n, H]` (n = 1 for `plain`).
Interface, shared by every kind:
  * `expand(h, n)`                      `[B, S, H] -> [B, S, n, H]` (the embedding copied into every stream)
  * `site.pre(streams) -> (x, coeffs)`  collapse the streams into the sublayer input `[B, S, H]`
  * `site.post(streams, y, coeffs)`     write the sublayer output back: `X'_k = post_k·y + Σ_j comb[j,k]·X_j`
  * `head(streams) -> h`                collapse the streams once after the last layer
`pre` returns the coefficients `post` needs because both come from the same input streams (computing
them twice would double the site's cost). `plain` is the n = 1 identity case: pre reads the only
stream, post adds y, and the result is bit-identical to `h + y`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .norm import RMSNorm, inverse_rms

# mHC identity-like init (docs/decisions.md#d2-mhc-init): logit margins that make `pre` read one stream
# (σ(±4) = 0.982 / 0.018) and `comb` start near the identity (row softmax of 4·I: 0.95 on the diagonal for n = 4).
_IDENTITY_LOGIT = 4.0
_IDENTITY_SCALE = 0.01  # small gate on the dynamic (input-dependent) part, as in HC/mHC community ports


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (V4 keeps every mHC parameter and product in fp32); float64 stays float64 for reference runs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expand(h: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S, H] -> [B, S, n, H]; a view for n = 1 (`plain`)."""
    return h.unsqueeze(2) if n == 1 else h.unsqueeze(2).expand(-1, -1, n, -1).contiguous()


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """V4's Sinkhorn–Knopp (`hc_split_sinkhorn`): row softmax + eps, column-normalise, then (iters - 1) ×
    (row, column) normalisation, every denominator + eps. logits [..., n, n] -> doubly stochastic."""
    m = torch.softmax(logits, dim=-1) + eps
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class PlainSite(nn.Module):
    """Pre-norm residual: one stream, x = X_0, X_0' = X_0 + y."""

    def pre(self, streams):
        return streams[:, :, 0], None

    def post(self, streams, y, coeffs):
        return streams + y.unsqueeze(2)


class _MixedStreams(nn.Module):
    """HC and mHC differ only in how `coefficients(streams)` -> (pre [B, S, n], post [B, S, n], mix [B, S, n, n])
    are made: x = Σ_j pre_j X_j feeds the sublayer; X_k' = post_k·y + Σ_j mix_jk X_j (float32)."""

    def forward(self, streams):
        """The coefficients. `pre` computes them through the module call so that hooks wrapping `forward`
        (accelerate's offload loads the parameters there) see every use of the site's parameters."""
        return self.coefficients(streams)

    def pre(self, streams):
        pre, post, mix = self(streams)
        x = torch.einsum("bsj,bsjd->bsd", pre, _fp32(streams))
        return x.to(streams.dtype), (post, mix)

    def post(self, streams, y, coeffs):
        post, mix = coeffs
        out = post.unsqueeze(-1) * _fp32(y).unsqueeze(2) + torch.einsum("bsjk,bsjd->bskd", mix, _fp32(streams))
        return out.to(streams.dtype)


class HCSite(_MixedStreams):
    """Dynamic Hyper-Connections (HC paper §2, unconstrained).

    `static_alpha [n, 1 + n]` holds A_m (column 0, stream weights of the sublayer input) and A_r (columns
    1.., stream mixing); `static_beta [n]` is B (output weights). Dynamic parts: tanh(H̄ W)·s added to
    each, with H̄ = RMSNorm(H) per stream. Init (paper): A_m = e_{site mod n}, A_r = I, B = 1, W = 0,
    s = 0.01 — the network starts as a pre-norm residual network.
    """

    def __init__(self, config, site_idx: int):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.site_idx = n, site_idx
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.static_alpha = nn.Parameter(torch.empty(n, 1 + n))
        self.static_beta = nn.Parameter(torch.empty(n))
        self.dynamic_alpha_fn = nn.Parameter(torch.empty(d, 1 + n))
        self.dynamic_beta_fn = nn.Parameter(torch.empty(d))
        self.dynamic_alpha_scale = nn.Parameter(torch.empty(()))
        self.dynamic_beta_scale = nn.Parameter(torch.empty(()))

    @torch.no_grad()
    def reset_parameters(self):
        """Called by `_init_weights`; the transformers `init` ops skip tensors loaded from a checkpoint."""
        alpha = torch.zeros(self.n, 1 + self.n)
        alpha[self.site_idx % self.n, 0] = 1.0
        alpha[:, 1:] = torch.eye(self.n)
        init.copy_(self.static_alpha, alpha)
        init.ones_(self.static_beta)
        init.zeros_(self.dynamic_alpha_fn)
        init.zeros_(self.dynamic_beta_fn)
        init.constant_(self.dynamic_alpha_scale, _IDENTITY_SCALE)
        init.constant_(self.dynamic_beta_scale, _IDENTITY_SCALE)

    def coefficients(self, streams):
        """streams [B, S, n, H] -> A_m [B, S, n], B [B, S, n], A_r [B, S, n, n] (float32)."""
        h_bar = _fp32(self.norm(streams))
        alpha = torch.tanh(h_bar @ _fp32(self.dynamic_alpha_fn)) * self.dynamic_alpha_scale + self.static_alpha
        beta = torch.tanh(h_bar @ _fp32(self.dynamic_beta_fn)) * self.dynamic_beta_scale + self.static_beta
        return alpha[..., 0], beta, alpha[..., 1:]


class MHCSite(_MixedStreams):
    """mHC exactly as DeepSeek-V4 releases it (V4 `Block.hc_pre` / `hc_post`), all in float32:

    mix = (fn · vec(X)) · rsqrt(mean(vec(X)²) + eps_norm)               [(2 + n)·n numbers per token]
    pre = σ(mix_pre·scale_0 + base_pre) + hc_eps;  post = 2σ(mix_post·scale_1 + base_post)
    comb = Sinkhorn(mix_res·scale_2 + base_res) (doubly stochastic), applied transposed.
    """

    def __init__(self, config, site_idx: int):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.site_idx = n, site_idx
        self.iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.init_kind, self.std = config.mhc_init, config.initializer_range
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * d))
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))

    @torch.no_grad()
    def reset_parameters(self):
        """`uniform`: transformers' DeepseekV4 init (fn ~ N(0, std), base 0, scale 1: pre ≈ 0.5 per stream,
        comb ≈ 1/n everywhere). `identity` (our default for training from scratch, docs/decisions.md#d2-mhc-init):
        the same fn, scale 0.01, base making pre read stream (site mod n), post = 1 and comb ≈ I, so the model
        starts as a pre-norm residual network with n identical streams."""
        n = self.n
        init.normal_(self.fn, mean=0.0, std=self.std)
        if self.init_kind == "uniform":
            init.zeros_(self.base)
            init.ones_(self.scale)
            return
        base_pre = torch.full((n,), -_IDENTITY_LOGIT)
        base_pre[self.site_idx % n] = _IDENTITY_LOGIT
        base_comb = _IDENTITY_LOGIT * torch.eye(n)
        init.copy_(self.base, torch.cat([base_pre, torch.zeros(n), base_comb.flatten()]))
        init.constant_(self.scale, _IDENTITY_SCALE)

    def coefficients(self, streams):
        """streams [B, S, n, H] -> pre [B, S, n], post [B, S, n], comb [B, S, n, n] (float32)."""
        n = self.n
        x = _fp32(streams.flatten(2))  # [B, S, n·H]
        mix = F.linear(x, _fp32(self.fn)) * inverse_rms(x, self.norm_eps)
        mix_pre, mix_post, mix_res = mix.split([n, n, n * n], dim=-1)
        base_pre, base_post, base_res = _fp32(self.base).split([n, n, n * n])
        scale = _fp32(self.scale)
        pre = torch.sigmoid(mix_pre * scale[0] + base_pre) + self.hc_eps
        post = 2 * torch.sigmoid(mix_post * scale[1] + base_post)
        comb = sinkhorn((mix_res * scale[2] + base_res).unflatten(-1, (n, n)), self.iters, self.hc_eps)
        return pre, post, comb


class PlainHead(nn.Module):
    def forward(self, streams):
        return streams[:, :, 0]


class HCHead(nn.Module):
    """HC paper: the streams are summed before the final norm."""

    def forward(self, streams):
        return streams.sum(2)


class HyperHead(nn.Module):
    """V4's final collapse (`hc_head`): w = σ(mix·scale + base) + eps, h = Σ_j w_j X_j (no Sinkhorn, no post)."""

    def __init__(self, config):
        super().__init__()
        n, d = config.hc_mult, config.hidden_size
        self.n, self.hc_eps, self.norm_eps = n, config.hc_eps, config.rms_norm_eps
        self.init_kind, self.std = config.mhc_init, config.initializer_range
        self.hc_fn = nn.Parameter(torch.empty(n, n * d))
        self.hc_base = nn.Parameter(torch.empty(n))
        self.hc_scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def reset_parameters(self):
        init.normal_(self.hc_fn, mean=0.0, std=self.std)
        init.zeros_(self.hc_base)
        init.constant_(self.hc_scale, 1.0 if self.init_kind == "uniform" else _IDENTITY_SCALE)

    def forward(self, streams):
        x = _fp32(streams.flatten(2))
        mix = F.linear(x, _fp32(self.hc_fn)) * inverse_rms(x, self.norm_eps)
        w = torch.sigmoid(mix * _fp32(self.hc_scale) + _fp32(self.hc_base)) + self.hc_eps  # [B, S, n]
        return torch.einsum("bsj,bsjd->bsd", w, _fp32(streams)).to(streams.dtype)


def build_site(config, layer_idx: int, site: int) -> nn.Module:
    """One residual site; `site` is 0 (attention) or 1 (FFN). Sites are numbered 2·layer + site."""
    kind = config.residual_kind
    if kind == "plain":
        return PlainSite()
    return (HCSite if kind == "hc" else MHCSite)(config, 2 * layer_idx + site)


def build_head(config) -> nn.Module:
    if config.residual_kind == "mhc":
        return HyperHead(config)
    return HCHead() if config.residual_kind == "hc" else PlainHead()
