"""Rotary position embeddings: default, linear and YaRN frequencies; interleaved or half-split pairs.

cos/sin are returned at half width ([B, S, dim/2], one angle per rotated pair) and already multiplied by
the YaRN attention factor, so both pair layouts share them.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def compute_inv_freq(rope_parameters: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin attention factor for one rotary width `dim`."""
    base = float(rope_parameters["rope_theta"])
    rope_type = rope_parameters.get("rope_type", "default")
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type == "default":
        return inv_freq, 1.0
    factor = float(rope_parameters["factor"])
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    # YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, linear ramp in between.
    original_max = rope_parameters["original_max_position_embeddings"]
    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    attention_factor = rope_parameters.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(rope_parameters: dict, head_dim: int) -> float:
    """head_dim^-1/2, times mscale(mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3 convention)."""
    scale = head_dim**-0.5
    if rope_parameters.get("rope_type", "default") == "yarn" and rope_parameters.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope_parameters["factor"]), rope_parameters["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """cos/sin for one rotary width. `inv_freq` is a non-persistent buffer: recomputed by `reset_parameters`."""

    def __init__(self, rope_parameters: dict, dim: int):
        super().__init__()
        self.rope_parameters, self.dim = dict(rope_parameters), dim
        inv_freq, self.attention_factor = compute_inv_freq(self.rope_parameters, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self):
        with torch.no_grad():
            self.inv_freq.copy_(compute_inv_freq(self.rope_parameters, self.dim)[0])

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)  # [B, S, dim/2]
        return (angles.cos() * self.attention_factor).to(dtype), (angles.sin() * self.attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, H, S, dim] by cos/sin [B, S, dim/2].

    interleaved=True rotates pairs (x0, x1), (x2, x3), ... (DeepSeek's layout) and returns them in that
    layout; False rotates (x_i, x_{i+dim/2}) (Llama/NeoX `rotate_half`).
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V4 partial RoPE: interleaved rotation of the *last* 2·cos.shape[-1] dims of x [B, H, S, D]."""
    rope_dim = 2 * cos.shape[-1]
    nope, rope = x.split([x.shape[-1] - rope_dim, rope_dim], dim=-1)
    return torch.cat((nope, apply_rope(rope, cos, sin, interleaved=True)), dim=-1)
