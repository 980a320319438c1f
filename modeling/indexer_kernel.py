"""The fused CPU lightning-indexer kernel (`indexer_topk.c`): build it, load it, call it.

`config.indexer_implementation = "fused"` routes DSA and CSA selection here, and so does the default "auto" for
CPU tensors when the kernel builds (`available()`). The eager path writes the float32 scores of each query chunk
against all its visible keys and makes several passes over them; on a CPU those passes and the matmul that feeds
them are most of a long prefill (bench/indexer_costs.py). The kernel scores and keeps a running top-k per query in
one pass, with bfloat16 q and k and float32 accumulation (the official V3.2 kernel uses FP8 q and k) on the AMX
tile unit where the CPU has one. Its picks equal the eager ones except where the bf16 rounding reorders
near-equal scores (`python bench/indexer_costs.py` reports the overlap).

The C source is compiled on first use with the system C compiler (`CC`, default `cc`) for the machine it runs
on (-march=native) into SEEKV4_KERNEL_CACHE (default ~/.cache/seekv4/kernels), keyed by a hash of source and
flags. With "fused", no compiler, or tensors not on the CPU, is an error that says so. With "auto", a kernel that
cannot be built is logged once (a warning naming the cause) and selection runs the eager path: never silently.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .workspace import reusable_buffer

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("indexer_topk.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11", "-D_GNU_SOURCE"]
_LOCK = threading.Lock()
_LIB = None
_LIB_ERROR = None  # why the kernel could not be built, once `available()` has tried (logged once)
_POOL = None


class IndexerKernelError(RuntimeError):
    pass


def _cache_dir() -> Path:
    root = os.environ.get("SEEKV4_KERNEL_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "seekv4" / "kernels"


def _build() -> Path:
    cc = shlex.split(os.environ.get("CC", "cc"))
    source = SOURCE.read_bytes()
    try:
        version = subprocess.run(cc + ["--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise IndexerKernelError(
            f"indexer_implementation='fused' needs a C compiler to build {SOURCE.name}, and `{' '.join(cc)}` "
            f"failed ({e}). Install gcc or clang (or point CC at one), or use indexer_implementation='eager'.") from e
    key = hashlib.sha256(source + " ".join(cc + FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = _cache_dir() / f"indexer_topk_{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise IndexerKernelError(f"cannot create the kernel cache {target.parent} ({e}); point SEEKV4_KERNEL_CACHE at "
                                 "a writable folder, or use indexer_implementation='eager'.") from e
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        res = subprocess.run(cc + FLAGS + [str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
        if res.returncode:
            raise IndexerKernelError(f"building {SOURCE} with `{' '.join(cc + FLAGS)}` failed:\n{res.stderr[-2000:]}\n"
                                     "Fix the compiler set-up (CC) or use indexer_implementation='eager'.")
        os.replace(out, target)  # atomic: concurrent builders both end with a complete file
    return target


def library():
    """The loaded kernel (built on first call); raises IndexerKernelError when it cannot be built."""
    global _LIB
    with _LOCK:
        if _LIB is None:
            lib = ctypes.CDLL(str(_build()))
            p, i64, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
            lib.seekv4_indexer_topk.argtypes = [p, p, p, p, i64, i32, i32, p, p, i32, i64, i64, p, i32]
            lib.seekv4_indexer_topk.restype = i32
            lib.seekv4_pack_keys.argtypes = [p, i64, i32, p, i64, i64]
            lib.seekv4_padded_dim.argtypes, lib.seekv4_padded_dim.restype = [i32], i32
            lib.seekv4_padded_keys.argtypes, lib.seekv4_padded_keys.restype = [i64], i64
            lib.seekv4_amx_enable.restype = i32
            lib.amx = bool(lib.seekv4_amx_enable())
            _LIB = lib
    return _LIB


def available() -> bool:
    """Whether the kernel builds and loads (tried once). The first failure is logged as a warning, since
    indexer_implementation="auto" then selects with the eager path (same picks, slower at long context)."""
    global _LIB_ERROR
    if _LIB is not None:
        return True
    if _LIB_ERROR is None:
        try:
            library()
        except (IndexerKernelError, OSError) as e:
            _LIB_ERROR = e
            logger.warning(f"indexer_implementation='auto': the fused CPU indexer kernel is unavailable, so DSA/CSA "
                           f"selection runs the eager float32 path (slower at long context). Cause: {e}")
    return _LIB is not None


def uses_amx() -> bool:
    return library().amx


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != n:
        _POOL = (n, ThreadPoolExecutor(max_workers=n, thread_name_prefix="seekv4-indexer"))
    return _POOL[1]


@torch.no_grad()
def fused_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, limit: torch.Tensor,
               key_padding: torch.Tensor | None, k: int, *, amx: bool | None = None) -> torch.Tensor:
    """q [B, L, Hi, D], w [B, L, Hi], keys [B, T, D], limit [B or 1, L] (query l sees the keys s < limit[l]),
    key_padding [B, T] bool or None -> idx [B, L, k] int64, best first, ties -> later key, -1 = none.

    `amx=False` forces the portable loop (same rounded products; used by tests on AMX machines)."""
    if q.device.type != "cpu":
        raise IndexerKernelError(f"indexer_implementation='fused' is a CPU kernel but the indexer runs on {q.device}; "
                                 "use indexer_implementation='eager' there.")
    lib = library()
    use_amx = lib.amx if amx is None else (amx and lib.amx)
    b, l, h, d = q.shape
    t = keys.shape[1]
    out = torch.empty(b, l, k, dtype=torch.int64)
    if l == 0 or k == 0:
        return out
    qf, wf, kf = q.float().contiguous(), w.float().contiguous(), keys.float().contiguous()
    limits = (limit.to(torch.int64) - 1).expand(b, l).contiguous()  # the kernel takes the last visible key
    valid = None if key_padding is None else key_padding[:, :t].to(torch.uint8).contiguous()
    threads = max(1, torch.get_num_threads())

    def run(i, s, e, packed=None):
        rc = lib.seekv4_indexer_topk(qf[i].data_ptr(), wf[i].data_ptr(), None if packed is None else packed.data_ptr(),
                                     kf[i].data_ptr(), t, h, d, limits[i].data_ptr(),
                                     None if valid is None else valid[i].data_ptr(), k, s, e, out[i].data_ptr(),
                                     int(use_amx))
        if rc:
            raise MemoryError("fused indexer kernel: out of memory for its per-thread buffers")

    if l * h <= 32:
        # decoding: each key tile is read once, so the kernel packs it just before use; one thread, as a pool
        # round trip and the torch threads spinning beside it cost more than the scan
        for i in range(b):
            run(i, 0, l)
        return out
    # prefill: pack all keys once (every group of queries reads them all), then split the queries; causal rows
    # grow with the query index, so many small ranges, longest (latest) first, keep the threads evenly loaded
    tiles = lib.seekv4_padded_keys(t) // 16
    per_row = tiles * 16 * lib.seekv4_padded_dim(d)
    packed = reusable_buffer(b * per_row, torch.int16).view(b, per_row)
    span = -(-tiles // threads)
    step = max(32, -(-l // (8 * threads)))
    packs = [(i, j, min(tiles, j + span)) for i in range(b) for j in range(0, tiles, span)]
    jobs = [(i, s, min(l, s + step)) for i in range(b) for s in range(0, l, step)][::-1]

    def parallel(fn, items):
        if threads == 1 or len(items) == 1:
            for item in items:
                fn(item)
        else:
            list(_pool(threads).map(fn, items))

    parallel(lambda p: lib.seekv4_pack_keys(kf[p[0]].data_ptr(), t, d, packed[p[0]].data_ptr(), p[1], p[2]), packs)
    parallel(lambda job: run(*job, packed[job[0]]), jobs)
    return out
