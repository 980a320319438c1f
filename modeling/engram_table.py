"""Engram table storage: one concatenated embedding table per Engram layer, kept in device memory, in host
memory while the model runs on an accelerator, or memory-mapped from a file on disk (tables larger than
RAM; spec §6.5).

The table is read through `gather(indices)` (or `prefetch(indices).wait()`, which starts the gather on a
worker thread so it overlaps the layers before the one that needs the rows) and trained through a sparse
path: the gathered rows are an autograd leaf whose gradient is accumulated as (row ids, row grads), and
`step(lr)` applies row-wise Adagrad to the touched rows only (the optimizer for huge embedding tables
used by DLRM/TorchRec: one float of state per row instead of Adam's two per element; spec Q6 leaves the
paper's choice open). The weight is a Parameter with `requires_grad=False`, so dense optimizers (the
`Trainer`'s AdamW) never see it and never touch untouched rows; `seekv4.training.EngramTableCallback`
calls `step` after each optimizer step.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

_ADAGRAD_EPS = 1e-10


class _Prefetched:
    def __init__(self, table: "EngramTable", indices: torch.Tensor, future):
        self.table, self.indices, self.future = table, indices, future

    def wait(self) -> torch.Tensor:
        return self.table._attach(self.indices, self.future.result())


class EngramTable(nn.Module):
    """rows [num_rows, dim]; `gather(indices [...]) -> [..., dim]` in the compute dtype of the weight."""

    def __init__(self, num_rows: int, dim: int, storage: str = "device", path: str | None = None):
        super().__init__()
        self.num_rows, self.dim, self.storage, self.path = num_rows, dim, storage, path
        self.weight = nn.Parameter(self._allocate(), requires_grad=False)
        # row-wise Adagrad state: running sum of mean squared row gradients (one float per row)
        self.register_buffer("row_sum_sq", torch.zeros(num_rows), persistent=False)
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._worker = ThreadPoolExecutor(1) if storage != "device" else None

    def _allocate(self) -> torch.Tensor:
        if self.storage != "disk":
            return torch.empty(self.num_rows, self.dim)
        return open_table_file(self.path, self.num_rows, self.dim)

    @torch.no_grad()
    def restore_storage(self):
        """After `from_pretrained` replaced the weight with the checkpoint's tensor: copy it back into this
        table's storage (host memory / the memory-mapped file) and freeze it for dense optimizers again."""
        loaded = self.weight.detach()
        target = self._allocate() if self.storage != "device" else loaded
        if target is not loaded:
            for start in range(0, self.num_rows, 1 << 20):  # chunked: no second full copy in RAM
                target[start:start + (1 << 20)].copy_(loaded[start:start + (1 << 20)])
        self.weight = nn.Parameter(target, requires_grad=False)
        self.row_sum_sq = self.row_sum_sq.to(target.device)

    def _apply(self, fn, recurse=True):
        # host / disk tables stay where they are when the model moves to an accelerator or changes dtype
        if self.storage == "device":
            return super()._apply(fn, recurse)
        return self

    # ---- read ------------------------------------------------------------------------------------
    def _read(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.weight.detach().index_select(0, indices.reshape(-1).to(self.weight.device))
        return rows.view(*indices.shape, self.dim)

    def _attach(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Make the rows a leaf whose gradient is recorded for the sparse update (training only)."""
        if self.training and torch.is_grad_enabled():
            rows = rows.requires_grad_(True)
            rows.register_hook(lambda grad: self._grads.append((indices.reshape(-1), grad.reshape(-1, self.dim))))
        return rows

    def gather(self, indices: torch.Tensor, device=None) -> torch.Tensor:
        return self._attach(indices, self._to(self._read(indices), device))

    def prefetch(self, indices: torch.Tensor, device=None) -> _Prefetched:
        """Start gathering now (host/disk: on a worker thread, then an async copy to `device`)."""
        indices_host = indices.to(self.weight.device)
        if self._worker is None:
            result = self._to(self._read(indices_host), device)
            return _Prefetched(self, indices, _Done(result))
        return _Prefetched(self, indices, self._worker.submit(lambda: self._to(self._read(indices_host), device)))

    @staticmethod
    def _to(rows: torch.Tensor, device) -> torch.Tensor:
        if device is None or torch.device(device) == rows.device:
            return rows
        return rows.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() else rows.to(device)

    # ---- sparse update ---------------------------------------------------------------------------
    def has_grad(self) -> bool:
        return bool(self._grads)

    def zero_grad(self):
        self._grads.clear()

    @torch.no_grad()
    def step(self, lr: float) -> torch.Tensor:
        """Row-wise Adagrad on the rows touched since the last step; returns their ids."""
        if not self._grads:
            return torch.empty(0, dtype=torch.long)
        dev = self.weight.device
        idx = torch.cat([i for i, _ in self._grads]).to(dev)
        grad = torch.cat([g for _, g in self._grads]).to(dev, torch.float32)
        self._grads.clear()
        rows, inverse = torch.unique(idx, return_inverse=True)
        summed = torch.zeros(rows.shape[0], self.dim, device=dev).index_add_(0, inverse, grad)  # [R, D]
        state = self.row_sum_sq.index_select(0, rows) + summed.pow(2).mean(-1)
        self.row_sum_sq.index_copy_(0, rows, state)
        update = summed * (lr / (state.sqrt() + _ADAGRAD_EPS)).unsqueeze(-1)
        new = self.weight.index_select(0, rows).float() - update
        self.weight.index_copy_(0, rows, new.to(self.weight.dtype))
        return rows

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, dim={self.dim}, storage={self.storage}"


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def open_table_file(path: str, num_rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """A [num_rows, dim] tensor memory-mapped (shared: writes reach the file) from a raw little-endian file,
    created (sparse, zero-filled) if absent. An existing file of another size is an error."""
    nbytes = num_rows * dim * torch.empty((), dtype=dtype).element_size()
    if os.path.exists(path):
        if os.path.getsize(path) != nbytes:
            raise ValueError(f"Engram table file {path} holds {os.path.getsize(path)} bytes, but a [{num_rows}, {dim}] "
                             f"{dtype} table needs {nbytes}; delete it or point engram_table_dir elsewhere.")
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=num_rows * dim, dtype=dtype).view(num_rows, dim)
