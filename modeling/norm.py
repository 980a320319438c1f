"""RMSNorm, computed in float32 (as every DeepSeek/Llama reference does) and cast back."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        # vector_norm reads x once; mean(x.pow(2)) would first write a full-size x² (at long context every
        # full-size temporary is a fresh mapping the OS must fault in)
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
        y = (x * torch.rsqrt(ms + self.variance_epsilon)).to(dtype)
        if torch.is_grad_enabled() and (y.requires_grad or self.weight.requires_grad):
            return self.weight * y
        if torch.result_type(self.weight, y) == y.dtype:
            return y.mul_(self.weight)  # inference: scale in place, no second full-size tensor
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"
