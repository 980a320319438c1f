"""Engram table storage: one concatenated embedding table per Engram layer, kept in device memory, in host
memory while the model runs on an accelerator, or memory-mapped from a file on disk (tables larger than
RAM).

The table is read through `gather(indices)` (or `prefetch(indices).wait()`, which starts the gather on a
worker thread so it overlaps the layers before the one that needs the rows) and trained through a sparse
path: the gathered rows are an autograd leaf whose gradient is accumulated as (row ids, row grads), and
`step(lr)` applies row-wise Adagrad to the touched rows only (the optimizer for huge embedding tables
used by DLRM/TorchRec: one float of state per row instead of Adam's two per element). The weight is a
Parameter with `requires_grad=False`, so dense optimizers (the `Trainer`'s AdamW) never see it and never
touch untouched rows; `seekv4.training.EngramTableCallback` calls `step` after each optimizer step.

Disk tables buffer updated rows in RAM (write-back): writing scattered rows into the shared mapping costs a
write fault per clean page plus its writeback (seconds per step, bench/RESULTS.md), so `step` writes into
the buffer, reads look there first, and `flush()` writes the buffer to the file as one sorted pass — when
it is full, before `state_dict()` (so `save_pretrained` sees every update) and on request. `weight` itself
is the file: read rows through `rows()` / `gather()`, or `flush()` first.

Disk table format. `T.bin` holds the raw rows ([rows, dim], little-endian); `T.bin.json`, its manifest
(written atomically: temp file, fsync, rename), holds the format name and version, shape, dtype, a creation id
and a state:
  * `dirty`: the rows may be half written and nothing can repair them — from creation (initialisation, or
    the copy of a checkpoint's table, writes the whole file) and from each `load_state_dict` until the next
    `flush()` (or the end of `from_pretrained`'s copy), which fsyncs the file and marks it `complete`;
  * `complete`: the file holds the table as of its last flush, plus the flush described by `T.bin.journal`
    if that file exists.
A flush is crash-safe by a redo journal, not by rewriting the (GB-sized) file: the file is fsynced (so what
earlier flushes wrote is durable and their journal can go), the sorted rows and their new values go to
`T.bin.journal.tmp` with a header (creation id, shape) and a CRC-32, which is fsynced and renamed to
`T.bin.journal` (the commit point), then the rows are written into the mapping. `flush()` (and so saving,
and the end of training) then fsyncs the file and deletes the journal; a flush because the buffer is full
leaves both to the next flush, so it does not wait for the writeback of its own scattered pages. A process
killed before the rename leaves the old table, one killed after leaves a journal that `open_table_file`
replays (the values are absolute, so replaying twice is harmless): on reopen a table is the old one or the
new one, never a mix. A `dirty` table, or a journal that fails its checks, is refused with a ValueError:
reload the model from its checkpoint.

Nothing writes a table it did not create. A model built from a config creates its table files exclusively
and raises if `engram_table_dir` already holds one: the folder may hold trained rows (of another run, or
the live table of a run that saved a checkpoint) that re-initialising would destroy, and opening them under
freshly initialised dense weights would silently mix two models; there is no way to tell a stale table from
one the user means to keep, so the user chooses: a new or empty folder, or `from_pretrained`.
`from_pretrained` copies the checkpoint's table (the source of truth) into new files: in `engram_table_dir`
when passed explicitly (which must not hold this model's tables), else in the config's folder if that holds
none of them (a fresh machine), else in a new folder created next to it (the usual case: the run that saved
the checkpoint still owns its live table there), named in a warning and in `model.config.engram_table_dir`.
"""
from __future__ import annotations

import itertools
import json
import os
import struct
import tempfile
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from transformers.utils import logging

from .fileio import fsync_path

logger = logging.get_logger(__name__)

_ADAGRAD_EPS = 1e-10
_FLUSH_CHUNK = 1 << 16  # rows per index_copy_ of a flush: bounds its temporary copy
_FORMAT, _FORMAT_VERSION = "seekv4-engram-table", 1
_JOURNAL_MAGIC = b"SEEKV4-ENGRAM-JOURNAL\n"
_RELOAD = ("Reload the model from its checkpoint (SeekV4ForCausalLM.from_pretrained), which copies the checkpoint's "
           "tables into new files.")


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
        self._manifest: dict | None = None  # disk: the manifest of the file this table created (None: no file yet)
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
        if self.storage != "disk" or torch.empty(0).device.type == "meta":
            return torch.empty(self.num_rows, self.dim)  # from_pretrained builds on meta: restore_storage creates it
        weight, self._manifest = create_table_file(self.path, self.num_rows, self.dim)
        return weight

    @torch.no_grad()
    def restore_storage(self, path: str | None = None):
        """After `from_pretrained` replaced the weight with the checkpoint's tensor: copy it back into this
        table's storage (host memory / a memory-mapped file this call creates at `path`, default `self.path`)
        and freeze it for dense optimizers again. `restore_engram_tables` chooses the folder."""
        loaded = self.weight.detach()
        if self.storage == "device":
            target = loaded
        elif self.storage == "host":
            target = self._allocate()
        elif self._manifest is None or (path is not None and path != self.path):
            self.path = path or self.path
            target, self._manifest = create_table_file(self.path, self.num_rows, self.dim)  # starts dirty
        else:  # the file this table created when it was built (not on the meta device)
            self.mark_dirty()
            target = _map_table_file(self.path, self.num_rows, self.dim, torch.float32)
        if target is not loaded:
            for start in range(0, self.num_rows, 1 << 20):  # chunked: no second full copy in RAM
                target[start:start + (1 << 20)].copy_(loaded[start:start + (1 << 20)])
        self.weight = nn.Parameter(target, requires_grad=False)
        self.row_sum_sq = self.row_sum_sq.to(target.device)
        if self.storage == "disk":
            self._new_write_buffer()  # the loaded weights supersede pending updates
            with self._lock:
                self._sync()  # the file now holds the checkpoint's table: durable and complete

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
        self.mark_dirty()  # a whole-table write: the journal does not cover it
        super()._load_from_state_dict(*args, **kwargs)

    def mark_dirty(self):
        """Disk: call before writing `weight` directly (initialisation, loading; `step` needs no call): until the
        next `flush()` the file counts as possibly half written, and opening it after a crash is refused."""
        if self.storage != "disk" or self._manifest is None or self._manifest["state"] == "dirty":
            return
        with self._lock:
            self._check_owner()
            self._set_state("dirty")
            if os.path.exists(self.path + ".journal"):  # of the last flush: superseded by the whole-table write
                os.remove(self.path + ".journal")

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
        """Write the buffered rows of a disk table to its file (sorted, so the file is walked once) through the
        journal, then fsync it: on return the file holds every update, durably, and is marked complete."""
        if self.storage == "disk":
            with self._lock:
                self._flush_locked(durable=True)

    def _flush_locked(self, durable: bool = False):
        """`durable=False` (the buffer is full, inside `step`): the journal of this flush stays until the next
        one, see `_write_file`."""
        if n := self._buffered:
            rows, order = self._buf_rows[:n].sort()
            self._write_file(rows, self._buf_vals, order)
            self._slot[rows] = -1
            self._buffered = 0
        if durable:
            self._sync()

    def _write_file(self, rows: torch.Tensor, values: torch.Tensor, order: torch.Tensor | None = None):
        """rows [R] ascending <- values[order] (values [R, D] when order is None), crash-safe: everything written
        before is made durable (`_sync`: at most one journal exists), this flush's journal is committed, then its
        rows go into the mapping. Its fsync waits for the next flush: by then the kernel has written most of
        these pages back in the background, so a flush during training rarely waits for the disk."""
        self._check_owner()  # before the journal too: its name is the table's
        self._sync()
        journal = self.path + ".journal"
        _write_journal(journal, self._manifest, rows, self._chunks(rows, values, order), self.weight.dtype)
        self._apply_rows(rows, values, order)

    def _apply_rows(self, rows: torch.Tensor, values: torch.Tensor, order: torch.Tensor | None):
        for part, vals in self._chunks(rows, values, order):
            self.weight.detach().index_copy_(0, rows[part], vals)

    def _chunks(self, rows, values, order):
        """(slice of `rows`, their values in the file's dtype), _FLUSH_CHUNK rows at a time."""
        for start in range(0, rows.shape[0], _FLUSH_CHUNK):
            part = slice(start, start + _FLUSH_CHUNK)
            vals = values[part] if order is None else values.index_select(0, order[part])
            yield part, vals.to(self.weight.dtype).contiguous()

    def _sync(self):
        """Make every write so far durable: fsync the file, then mark it complete if it was dirty, or delete the
        journal of the last flush (now redundant). A no-op when neither is pending, or before the file exists."""
        if self._manifest is None:
            return
        dirty, journal = self._manifest["state"] == "dirty", self.path + ".journal"
        pending = os.path.exists(journal)
        if not (dirty or pending):
            return
        self._check_owner()
        fsync_path(self.path)
        if dirty:
            self._set_state("complete")
        if pending:
            os.remove(journal)
            fsync_path(os.path.dirname(os.path.abspath(journal)))

    def _set_state(self, state: str):
        self._manifest = {**self._manifest, "state": state}
        _write_manifest(self.path, self._manifest)

    def _check_owner(self):
        """Write only the table this object created: its folder may have been emptied and refilled meanwhile."""
        on_disk = _read_manifest(self.path).get("creation_id")
        if on_disk != self._manifest["creation_id"]:
            raise ValueError(f"Engram table {self.path} is no longer the one this model created (creation id "
                             f"{on_disk}, expected {self._manifest['creation_id']}): refusing to write it. Point "
                             "engram_table_dir at a folder that no other run uses.")

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


def restore_engram_tables(model, explicit_table_dir: bool):
    """`from_pretrained`: copy every loaded Engram table into its storage; disk tables into new files, in the
    folder chosen as the module docstring says (`explicit_table_dir`: the caller passed `engram_table_dir`)."""
    tables = [m for m in model.modules() if isinstance(m, EngramTable)]
    disk = [t for t in tables if t.storage == "disk"]
    folder = None
    if disk:
        folder = _folder_for_load(model.config.engram_table_dir, [os.path.basename(t.path) for t in disk],
                                  explicit_table_dir)
        model.config.engram_table_dir = folder
    for table in tables:
        table.restore_storage(os.path.join(folder, os.path.basename(table.path)) if table.storage == "disk" else None)


def _folder_for_load(folder: str, names: list[str], explicit: bool) -> str:
    taken = [os.path.basename(f) for name in names for f in table_file_names(os.path.join(folder, name))
             if os.path.exists(f)]
    if not taken:
        return folder
    if explicit:
        raise ValueError(f"engram_table_dir {folder} already holds {', '.join(taken)}, which this call did not "
                         "create: loading never overwrites a table (it may be the live table of another run). Pass "
                         "a new or empty engram_table_dir, or none to load into a new folder next to the "
                         "checkpoint config's one.")
    parent, base = os.path.split(os.path.abspath(folder))
    new = tempfile.mkdtemp(prefix=f"{base}-loaded-", dir=parent)
    logger.warning(f"The checkpoint config's engram_table_dir {folder} holds Engram tables ({', '.join(taken)}) that "
                   f"loading must not overwrite; the checkpoint's tables go to the new folder {new} "
                   "(model.config.engram_table_dir). Pass engram_table_dir= to choose the folder.")
    return new


def table_file_names(path: str) -> list[str]:
    """The files of the disk table at `path`: the rows, the manifest, the journal of an unfinished flush."""
    return [path, path + ".json", path + ".journal"]


def create_table_file(path: str, num_rows: int, dim: int, dtype=torch.float32) -> tuple[torch.Tensor, dict]:
    """A new [num_rows, dim] table file (sparse, zero-filled, memory-mapped: writes reach the file) and its
    manifest, state `dirty` until the first flush. A table file that exists already is an error: this call
    did not create it, so it neither opens nor overwrites it."""
    folder = os.path.dirname(os.path.abspath(path))
    existing = [os.path.basename(f) for f in table_file_names(path) if os.path.exists(f)]
    if existing:
        raise ValueError(f"Engram table folder {folder} already holds {', '.join(existing)}, which this call did not "
                         "create: a new model never opens or re-initialises an existing table (it may hold trained "
                         "rows). Pass a new or empty engram_table_dir, or load the trained model with "
                         "SeekV4ForCausalLM.from_pretrained(checkpoint), which copies its tables into new files.")
    os.makedirs(folder, exist_ok=True)
    manifest = dict(format=_FORMAT, version=_FORMAT_VERSION, num_rows=num_rows, dim=dim, dtype=_dtype_name(dtype),
                    creation_id=uuid.uuid4().hex, state="dirty")
    with open(path, "xb") as f:  # exclusive: never truncates a file that appeared meanwhile
        f.truncate(num_rows * dim * dtype.itemsize)
    _write_manifest(path, manifest)
    return _map_table_file(path, num_rows, dim, dtype), manifest


def open_table_file(path: str, num_rows: int, dim: int, dtype=torch.float32) -> torch.Tensor:
    """Map an existing table (to inspect it, or after a crash) as a [num_rows, dim] tensor: its manifest must
    match the shape and dtype; a committed journal (a flush killed after its commit point) is replayed; a
    `dirty` table or a damaged journal is refused. Open a table only while no process is writing it."""
    manifest = _read_manifest(path)
    want = dict(num_rows=num_rows, dim=dim, dtype=_dtype_name(dtype))
    have = {key: manifest.get(key) for key in want}
    if have != want:
        raise ValueError(f"Engram table {path} holds a [{have['num_rows']}, {have['dim']}] {have['dtype']} table "
                         f"(manifest {path}.json), not the [{num_rows}, {dim}] {want['dtype']} one asked for; pass "
                         "the table's own shape, or point engram_table_dir elsewhere.")
    nbytes = num_rows * dim * dtype.itemsize
    size = os.path.getsize(path) if os.path.exists(path) else None
    if size != nbytes:
        raise ValueError(f"Engram table {path} holds {size} bytes, its manifest a [{num_rows}, {dim}] "
                         f"{want['dtype']} table of {nbytes}: the file was removed, truncated or replaced. {_RELOAD}")
    if manifest.get("state") != "complete":
        raise ValueError(f"Engram table {path} is marked {manifest.get('state')!r} (not 'complete') in {path}.json: "
                         "a whole-table write (initialisation, a checkpoint copy, load_state_dict) was not finished "
                         "by a flush, so its rows may be half written, and no journal can repair that. " + _RELOAD)
    if os.path.exists(path + ".journal.tmp"):  # a flush killed before its commit point: the rows are untouched
        os.remove(path + ".journal.tmp")
    weight = _map_table_file(path, num_rows, dim, dtype)
    if os.path.exists(path + ".journal"):
        _replay_journal(path, weight, manifest)
    return weight


def _map_table_file(path: str, num_rows: int, dim: int, dtype) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=num_rows * dim, dtype=dtype, device="cpu").view(num_rows, dim)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _write_manifest(path: str, manifest: dict):
    tmp = path + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path + ".json")
    fsync_path(os.path.dirname(os.path.abspath(path)))


def _read_manifest(path: str) -> dict:
    try:
        with open(path + ".json") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"Engram table {path} has no manifest {path}.json: it was not written by this version of "
                         f"seekv4, or its creation was interrupted. {_RELOAD}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"Engram table manifest {path}.json is not valid JSON ({err}). {_RELOAD}") from None
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if version != _FORMAT_VERSION or manifest.get("format") != _FORMAT:
        raise ValueError(f"{path}.json is not a version-{_FORMAT_VERSION} {_FORMAT} manifest. {_RELOAD}")
    return manifest


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def _write_journal(journal: str, manifest: dict, rows: torch.Tensor, chunks, dtype: torch.dtype):
    """Layout: magic, u32 header length, JSON header, rows int64 [R], values [R, D], u32 CRC-32 of all before.
    Written to `journal.tmp`, fsynced, then renamed to `journal`: the rename is the commit point."""
    header = json.dumps(dict(creation_id=manifest["creation_id"], rows=int(rows.shape[0]), dim=manifest["dim"],
                             dtype=_dtype_name(dtype))).encode()
    tmp, crc = journal + ".tmp", 0
    with open(tmp, "wb") as f:  # a leftover .tmp is an uncommitted journal of this table: replaced
        head = [_JOURNAL_MAGIC, struct.pack("<I", len(header)), header, _bytes(rows.to(torch.int64))]
        for piece in itertools.chain(head, (_bytes(vals) for _, vals in chunks)):  # one chunk in memory at a time
            f.write(piece)
            crc = zlib.crc32(piece, crc)
        f.write(struct.pack("<I", crc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, journal)
    fsync_path(os.path.dirname(os.path.abspath(journal)))


def _replay_journal(path: str, weight: torch.Tensor, manifest: dict):
    """Redo the committed flush in `path.journal` (checked whole first), fsync the table, delete the journal."""
    journal = path + ".journal"

    def damaged(why: str) -> ValueError:
        return ValueError(f"Engram table journal {journal} is damaged ({why}), so the table {path} may hold part of "
                          f"a flush that cannot be redone. {_RELOAD}")

    with open(journal, "rb") as f:
        if f.read(len(_JOURNAL_MAGIC)) != _JOURNAL_MAGIC:
            raise damaged("not a seekv4 Engram journal")
        try:
            (header_len,) = struct.unpack("<I", f.read(4))
            header = json.loads(f.read(header_len))
            n, dim, dtype = int(header["rows"]), int(header["dim"]), getattr(torch, header["dtype"])
        except (struct.error, ValueError, KeyError, AttributeError, TypeError) as err:
            raise damaged(f"unreadable header: {err}") from None
        if header.get("creation_id") != manifest["creation_id"] or dim != weight.shape[1] or dtype != weight.dtype:
            raise damaged(f"it belongs to another table: header {header}")
        start, row_bytes = f.tell(), dim * dtype.itemsize
        if os.path.getsize(journal) != start + n * (8 + row_bytes) + 4:
            raise damaged(f"{os.path.getsize(journal)} bytes, the header says {n} rows")
        f.seek(0)
        crc, left = 0, os.path.getsize(journal) - 4
        while left:
            piece = f.read(min(left, 1 << 24))
            crc, left = zlib.crc32(piece, crc), left - len(piece)
        if struct.unpack("<I", f.read(4))[0] != crc:
            raise damaged("CRC-32 mismatch")
        f.seek(start)
        rows = torch.frombuffer(bytearray(f.read(8 * n)), dtype=torch.int64) if n else torch.empty(0, dtype=torch.long)
        if n and not (0 <= int(rows.min()) and int(rows.max()) < weight.shape[0]):
            raise damaged("row ids outside the table")
        for begin in range(0, n, _FLUSH_CHUNK):
            part = rows[begin:begin + _FLUSH_CHUNK]
            vals = torch.frombuffer(bytearray(f.read(part.shape[0] * row_bytes)), dtype=dtype).view(-1, dim)
            weight.index_copy_(0, part, vals)
    fsync_path(path)
    os.remove(journal)
    fsync_path(os.path.dirname(os.path.abspath(path)))
