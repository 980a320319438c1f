"""RMS normalisation, the one place for it: `inverse_rms` (the factor), `rms_normalize` (weightless, as V4's per-head
query norm, Engram's gates and mHC's coefficient projection use it) and the `RMSNorm` module (with a learned scale).

Computed in at least float32, as every DeepSeek / Llama reference does, and cast back by the callers that want the
input dtype. `vector_norm` reads x once; `x.pow(2).mean()` would first write a full-size x² (at long context every
full-size temporary is a fresh mapping the OS must fault in).
"""
import torch
from torch import nn


def inverse_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x², last dim) + eps), keepdim, in float32 (float64 stays float64)."""
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
    return torch.rsqrt(ms + eps)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) without a weight, in float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) * inverse_rms(x, eps)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = rms_normalize(x, self.variance_epsilon).to(x.dtype)
        if torch.is_grad_enabled() and (y.requires_grad or self.weight.requires_grad):
            return self.weight * y
        if torch.result_type(self.weight, y) == y.dtype:
            return y.mul_(self.weight)  # inference: scale in place, no second full-size tensor
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
