"""What every benchmark script shares: machine description, peak-RSS and FLOP-rate probes, timers around library
functions, fresh-process workers, and Markdown tables.

Each measured point runs in a fresh subprocess (`run_worker`), so peak RSS is per point and one point's allocator
state cannot slow the next. Peak RSS is Linux's VmHWM after resetting it (write "5" to /proc/self/clear_refs) right
before the measured call, minus VmRSS at that moment. The matmul probe brackets points to show the CPU phase on
shared machines: compare absolute times only between rows with similar probes.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


# ---- machine -----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> list[str]:
    """The vector / matrix extensions among ISA_FLAGS that this CPU reports (what kernel paths depend on)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return [f for f in ISA_FLAGS if f in flags]


def machine_line(threads: int) -> str:
    """One line naming everything a figure depends on: CPU model and ISA, cores, threads, library versions."""
    import transformers

    return (f"CPU {cpu_model()} (ISA: {' '.join(cpu_isa()) or 'none of ' + '/'.join(ISA_FLAGS)}), "
            f"os.cpu_count()={os.cpu_count()}, torch.get_num_threads()={threads}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}; "
            f"loadavg at start {os.getloadavg()[0]:.1f}")


def git_head(path: str) -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(path)))
    return out.stdout.strip() or "?"


def header(title: str, script: str, threads: int, argv: list[str]) -> str:
    """The lines every RESULTS entry starts with: title, date, machine, commit and the exact command."""
    return "\n".join([
        f"# {title} ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        machine_line(threads),
        f"repo HEAD {git_head(script)}; command: python bench/{os.path.basename(script)} {' '.join(argv)}",
    ])


def code_hash(files: tuple[str, ...]) -> str:
    """Short hash of the measured library source files (a change mid-run is then visible in the output)."""
    import seekv4

    root = os.path.dirname(seekv4.__file__)
    h = hashlib.sha256()
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


# ---- memory ----------------------------------------------------------------------------------------

def status_kib(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, VmSize)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns that RSS (KiB), the base of `peak_mib_since`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def peak_mib_since(base_kib: int) -> float:
    return (status_kib("VmHWM") - base_kib) / 1024


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def limit_memory(gib: float) -> None:
    """Cap this process's address-space growth at `gib` GiB beyond its current size (0: no cap), so an
    out-of-memory point fails with an allocation error in its worker instead of waking the OOM killer."""
    if gib > 0:
        cap = status_kib("VmSize") * 1024 + int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))


def short_error(e: BaseException) -> str:
    """torch's allocation failure is a RuntimeError with a long message: keep the size."""
    msg = str(e)
    m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", msg)
    if m:
        return f"{type(e).__name__}: out of memory (a {int(m.group(1)) / 2**20:,.0f} MiB allocation failed)"
    return f"{type(e).__name__}: {msg[:200]}"


# ---- time --------------------------------------------------------------------------------------------

def matmul_gflops(size: int = 512, n: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Median FLOP rate of a size^3 matmul on this process's threads (the machine-phase probe)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b

    def one():
        t0 = time.perf_counter()
        a @ b
        return time.perf_counter() - t0

    return 2 * size**3 / statistics.median(one() for _ in range(n)) / 1e9


class Timers:
    """Accumulated seconds per key of library functions wrapped by `wrap` (CPU ops are synchronous, so wall time
    around a call is its cost; nested wrappers count nested time in both keys)."""

    def __init__(self):
        self.times: dict[str, float] = defaultdict(float)

    def wrap(self, fn, key: str):
        times = self.times

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[key] += time.perf_counter() - t0

        wrapper.__wrapped__ = fn
        return wrapper

    def clear(self):
        self.times.clear()

    def snapshot(self) -> dict[str, float]:
        return dict(self.times)


def median_of(runs: list[dict]) -> dict:
    """Per-key median over runs (a key missing from a run counts as 0)."""
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in {k for r in runs for k in r}}


# ---- workers -----------------------------------------------------------------------------------------

def emit_result(out: dict) -> None:
    """Worker side: the one line `run_worker` reads back."""
    print("RESULT " + json.dumps(out), flush=True)


def run_worker(script: str, spec: dict, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run `script --worker SPEC` in a fresh process; its last RESULT line, or an error entry."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "wall": time.perf_counter() - t0}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-proc.returncode}: OOM?" if proc.returncode < 0 else tail[0][:200]
        return {"error": f"worker exit code {proc.returncode} ({how})", "wall": time.perf_counter() - t0}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall"] = time.perf_counter() - t0
    return out


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def brief(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k not in ("runs", "times")})


# ---- tables ------------------------------------------------------------------------------------------

def fk(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table; `align` is one char per column ('r' right, 'l' left; default: first column right, rest
    right except a trailing 'notes' column)."""
    align = align or "".join("l" if h in ("notes", "reference", "status", "target") else "r" for h in headers)
    rule = "|".join("---:" if a == "r" else "---" for a in align)
    lines = ["| " + " | ".join(headers) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, body: str) -> None:
    print(f"## {title}\n\n{body}\n")


def target_row(name: str, value: float | None, op: str, threshold: float, reference: str = "") -> list:
    """One row of a targets table: measured ratio, threshold, met / NOT met."""
    if value is None:
        return [name, "n/a", f"{op} {threshold}x", "not measured", reference]
    met = value <= threshold if op == "<=" else value >= threshold
    return [name, f"{value:.2f}x", f"{op} {threshold}x", "**met**" if met else "**NOT met**", reference]


TARGET_HEADERS = ["target", "measured", "threshold", "status", "reference"]


def build_kernel_for(march: str | None) -> None:
    """Build the fused indexer kernel for `-march=<march>` instead of the host's (`haswell`: AVX2 + FMA only, no
    AVX-512 / AMX), so an AVX2-only CPU's code path can be timed on this machine. Call before the kernel is first
    used; the kernel cache is keyed by the flags, so the native build is not replaced."""
    if not march:
        return
    from seekv4.modeling import indexer_kernel

    indexer_kernel.FLAGS[:] = [f"-march={march}" if f == "-march=native" else f for f in indexer_kernel.FLAGS]
