"""The weight a Linear layer actually applies, for the few places that need it in another shape than `x @ W.T`.

MLA's absorbed attention folds `kv_b_proj` into the query (q·W_UK, a product from the other side) and V4's
grouped output sends group g through rows g·r:(g+1)·r of `o_a_proj` only. Reading `.weight` there would bypass
whatever wraps the layer: a PEFT LoRA layer (the adapter delta), a bitsandbytes 4-bit layer (a packed uint8
`weight`), an accelerate offload hook (a meta `weight` until `forward` loads it). So every such use goes through
here, and only calls the module: `linear([I; 0])` is `[Wᵀ; b]` for any affine layer, wrapped or not. A plain
`nn.Linear` with no hooks applies its own `.weight`, which is then read directly (no extra cost at decode).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module


def plain_linear(linear: nn.Module) -> bool:
    """True if `linear(x)` is exactly `F.linear(x, linear.weight, linear.bias)`: an unwrapped, unhooked nn.Linear."""
    return (
        type(linear) is nn.Linear
        and type(linear.weight) in (nn.Parameter, torch.Tensor)
        and not linear.weight.is_meta
        and "forward" not in vars(linear)  # accelerate's hooks replace the bound forward
        and not (linear._forward_hooks or linear._forward_pre_hooks)
        and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
    )


def _affine_parts(linear: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) as `linear` applies them to inputs of `like`'s dtype and device, by calling it on
    the identity plus one zero row (in + 1 rows). Differentiable, so adapters' parameters get their gradients."""
    n = linear.in_features
    probe = torch.cat((torch.eye(n, dtype=like.dtype, device=like.device), like.new_zeros(1, n)))
    out = linear(probe)
    bias = out[-1]
    return (out[:-1] - bias).T, bias


def effective_weight(linear: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight `linear` applies (LoRA delta included, 4-bit dequantised, offloaded weights loaded),
    in `like`'s dtype and on its device. For a wrapped layer this costs one (in + 1)-row call per use and is never
    cached, so it cannot go stale while the weights train."""
    if plain_linear(linear):
        return linear.weight
    return _affine_parts(linear, like)[0]


def grouped_linear(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Block-diagonal use of `linear` (in = I, out = G·r): x [..., G, I] -> [..., G, r], group g through output rows
    g·r:(g+1)·r only (DeepSeek-V4's grouped output projection).

    A wrapped layer is either called on x itself, every group through every block keeping the diagonal (cheaper
    while x has few rows, as in decoding), or on the identity for its effective weight (cheaper for long inputs)."""
    g, n = x.shape[-2], x.shape[-1]
    if plain_linear(linear):
        y = torch.einsum("...gi,gri->...gr", x, linear.weight.view(g, -1, n))
        return y if linear.bias is None else y + linear.bias.view(g, -1)
    tokens = x.numel() // (g * n)
    if tokens * g * g < n + tokens * g:
        return linear(x).unflatten(-1, (g, -1)).diagonal(dim1=-3, dim2=-2).transpose(-1, -2)
    weight, bias = _affine_parts(linear, x)
    return torch.einsum("...gi,gri->...gr", x, weight.view(g, -1, n)) + bias.view(g, -1)
