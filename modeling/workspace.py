"""Reusable per-thread CPU scratch buffers for hot paths that would otherwise allocate a fresh multi-MB tensor
per call: without a caching allocator every such tensor is new pages the OS must fault in and zero, which can
cost more than the work that fills it. Per thread and per dtype, so concurrent forwards and different users
(the eager indexer's float32 scores, the fused kernel's packed keys) never share one; accelerators use their
caching allocator instead."""
from __future__ import annotations

import threading

import torch

_BUFFERS = threading.local()


def reusable_buffer(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """A 1-D view of `numel` elements; its contents are undefined and valid until this thread's next call for the
    same dtype."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _BUFFERS.__dict__.setdefault("by_dtype", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]
