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

Disk tables buffer updated rows in RAM (write-back): writing scattered rows into the shared mapping costs a
write fault per clean page plus its writeback (seconds per step, bench/RESULTS.md), so `step` writes into
the buffer, reads look there first, and `flush()` writes the buffer to the file as one sorted pass — when
it is full, before `state_dict()` (so `save_pretrained` sees every update) and on request. `weight` itself
is the file: read rows through `rows()` / `gather()`, or `flush()` first.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

_ADAGRAD_EPS = 1e-10
_FLUSH_CHUNK = 1 << 16  # rows per index_copy_ of a flush: bounds its temporary copy


class _Prefetched:
    def __init__(self, table: "EngramTable", indices: torch.Tensor, future):
        self.table, self.indices, self.future = table, indices, future

    def wait(self) -> torch.Tensor:
        return self.table._attach(self.indices, self.future.result())


class EngramTable(nn.Module):
    """rows [num_rows, dim]; `gather(indices [...]) -> [..., dim]` in the compute dtype of the weight."""

    def __init__(self, num_rows: int, dim: int, storage: str = "device", path: str | None = None,
                 write_buffer_rows: int = 1 << 20):
        super().__init__()
        self.num_rows, self.dim, self.storage, self.path = num_rows, dim, storage, path
        self.weight = nn.Parameter(self._allocate(), requires_grad=False)
        # row-wise Adagrad state: running sum of mean squared row gradients (one float per row)
        self.register_buffer("row_sum_sq", torch.zeros(num_rows), persistent=False)
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._worker = ThreadPoolExecutor(1) if storage != "device" else None
        if storage == "disk":
            self._capacity = min(num_rows, write_buffer_rows)
            self._lock = threading.Lock()  # the prefetch worker reads while the main thread may write
            self._new_write_buffer()

    def _new_write_buffer(self):
        """Empty write-back buffer in host memory: slot s holds row buf_rows[s] with value buf_vals[s]. (Again after
        `from_pretrained`, which builds the model on the meta device: these are not registered buffers.)"""
        with torch.device("cpu"):
            self._slot = torch.full((self.num_rows,), -1, dtype=torch.int32)  # row -> slot, -1: the file is current
            self._buf_rows = torch.empty(self._capacity, dtype=torch.long)  # [C]
            self._buf_vals = torch.empty(self._capacity, self.dim)  # [C, D] fp32
        self._buffered = 0

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
        if self.storage == "disk":
            self._new_write_buffer()  # the loaded weights supersede pending updates

    def _apply(self, fn, recurse=True):
        # host / disk tables stay where they are when the model moves to an accelerator or changes dtype
        if self.storage == "device":
            return super()._apply(fn, recurse)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.flush()  # state_dict / save_pretrained read the file
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_buffer()
        super()._load_from_state_dict(*args, **kwargs)

    # ---- read ------------------------------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [R] -> current values [R, D] (buffered updates included), no autograd."""
        ids = ids.to(self.weight.device)
        if self.storage != "disk":
            return self.weight.detach().index_select(0, ids)
        with self._lock:
            if not self._buffered:
                return self.weight.detach().index_select(0, ids)
            slot = self._slot.index_select(0, ids)  # [R]
            hit = slot >= 0
            out = torch.empty(ids.shape[0], self.dim, dtype=self.weight.dtype)
            out[hit] = self._buf_vals.index_select(0, slot[hit].long()).to(out.dtype)
            out[~hit] = self.weight.detach().index_select(0, ids[~hit])  # file pages of buffered rows stay untouched
            return out

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [...] -> rows [..., D], no autograd. `gather` and `prefetch` read through the module call so that
        hooks wrapping `forward` (accelerate's offload loads the weight there) see the weight."""
        return self.rows(indices.reshape(-1)).view(*indices.shape, self.dim)

    def _attach(self, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Make the rows a leaf whose gradient is recorded for the sparse update (training only)."""
        if self.training and torch.is_grad_enabled():
            rows = rows.requires_grad_(True)
            rows.register_hook(lambda grad: self._grads.append((indices.reshape(-1), grad.reshape(-1, self.dim))))
        return rows

    def gather(self, indices: torch.Tensor, device=None) -> torch.Tensor:
        return self._attach(indices, self._to(self(indices), device))

    def prefetch(self, indices: torch.Tensor, device=None) -> _Prefetched:
        """Start gathering now (host/disk: on a worker thread, then an async copy to `device`)."""
        if self._worker is None:
            return _Prefetched(self, indices, _Done(self._to(self(indices), device)))
        indices_host = indices.cpu()  # host and disk tables live in host memory
        return _Prefetched(self, indices, self._worker.submit(lambda: self._to(self(indices_host), device)))

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
        new = self.rows(rows).float() - update
        self._write(rows, new)
        return rows

    @torch.no_grad()
    def _write(self, rows: torch.Tensor, values: torch.Tensor):
        """rows [R] distinct, ascending; values [R, D]."""
        if self.storage != "disk":
            self.weight.index_copy_(0, rows, values.to(self.weight.dtype))
            return
        with self._lock:
            slot = self._slot.index_select(0, rows)
            fresh = slot < 0
            n_fresh = int(fresh.sum())
            if self._buffered + n_fresh > self._capacity:
                self._flush_locked()
                slot, fresh, n_fresh = self._slot.index_select(0, rows), torch.ones_like(fresh), rows.shape[0]
                if n_fresh > self._capacity:  # one step touched more rows than the buffer holds
                    self._write_file(rows, values)
                    return
            new = torch.arange(self._buffered, self._buffered + n_fresh, dtype=torch.int32)
            slot[fresh] = new
            self._slot[rows[fresh]] = new
            self._buf_rows[self._buffered:self._buffered + n_fresh] = rows[fresh]
            self._buffered += n_fresh
            self._buf_vals[slot.long()] = values.float()

    def flush(self):
        """Write the buffered rows of a disk table to its file (sorted, so the file is walked once)."""
        if self.storage == "disk":
            with self._lock:
                self._flush_locked()

    def _flush_locked(self):
        n = self._buffered
        if not n:
            return
        rows, order = self._buf_rows[:n].sort()
        self._write_file(rows, self._buf_vals, order)
        self._slot[rows] = -1
        self._buffered = 0

    def _write_file(self, rows: torch.Tensor, values: torch.Tensor, order: torch.Tensor | None = None):
        """rows [R] ascending <- values[order] (values [R, D] when order is None)."""
        for start in range(0, rows.shape[0], _FLUSH_CHUNK):
            part = slice(start, start + _FLUSH_CHUNK)
            vals = values[part] if order is None else values.index_select(0, order[part])
            self.weight.detach().index_copy_(0, rows[part], vals.to(self.weight.dtype))

    def _drop_buffer(self):
        if self.storage == "disk":
            with self._lock:
                self._slot[self._buf_rows[:self._buffered]] = -1
                self._buffered = 0

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
