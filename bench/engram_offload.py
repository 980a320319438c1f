"""Engram table offload: training-step time (forward + backward + row-wise table update) with a >= 4 GiB Engram
table memory-mapped from disk vs the same table in RAM.

    python bench/engram_offload.py [--gib 4.2] [--steps 16] [--buffer-mib 256]

The backbone is small (the table is larger than every other parameter combined); both models share its
weights. RAM and disk steps alternate (ABBA order, so neither always runs second) on the same batches, so CPU
contention from other jobs hits both alike; the script reports per-phase medians, the ratio of median steps
and the median of the per-pair ratios. The disk table's write-back buffer is flushed when full (counted in
the step that triggers it: journal, rows; the fsync of the file waits for the next flush, by when kernel threads
have mostly written the pages back) and once at the end of each regime; that final flush (`flush()`: durable, so
it includes the fsync of the file) is timed and amortised over the steps whose updates it wrote (the separate
fsync after it is then ~0). Two regimes for the mapped file: resident in the page cache (a table that
fits in free RAM), and after evicting it (posix_fadvise DONTNEED), so every row read is a random 4 KiB read
from the disk (a table larger than RAM). The table file lives in a temporary directory deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

from seekv4 import SeekV4Config, SeekV4ForCausalLM  # noqa: E402

PHASES = ("forward", "backward", "update", "step")


def config(gib: float, **kw):
    heads, orders, dim = 8, 2, 64
    base = int(gib * 2**30 / (4 * dim * heads * orders))
    return SeekV4Config.from_preset(
        "tiny-gqa", hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=4096, engram_layer_ids=[1], engram_max_ngram_size=3, engram_n_heads=heads,
        engram_head_dim=dim, engram_vocab_size=base, engram_kernel_size=0, **kw)


def step(model, ids) -> dict[str, float]:
    t0 = time.perf_counter()
    out = model(ids, labels=ids, use_cache=False)
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    model.step_engram_tables(1e-3)
    model.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return dict(forward=t1 - t0, backward=t2 - t1, update=t3 - t2, step=t3 - t0)


def run_regime(ram, disk, batches) -> tuple[list, list, float, float]:
    """ABBA-interleaved steps; returns per-step phase times of both, the timed final flush and the fsync of the
    file after it (s: the writeback that kernel threads do in the background during training)."""
    t_ram, t_disk = [], []
    for i, ids in enumerate(batches):
        if i % 2 == 0:
            t_ram.append(step(ram, ids)), t_disk.append(step(disk, ids))
        else:
            t_disk.append(step(disk, ids)), t_ram.append(step(ram, ids))
    table = disk.model.layers[1].engram.table
    start = time.perf_counter()
    table.flush()
    flushed = time.perf_counter()
    fd = os.open(table.path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    return t_ram, t_disk, flushed - start, time.perf_counter() - flushed


def report(name: str, t_ram, t_disk, flush_s: float, fsync_s: float):
    med = {who: {p: statistics.median(t[p] for t in ts) for p in PHASES}
           for who, ts in (("ram", t_ram), ("disk", t_disk))}
    per_step_flush = flush_s / len(t_disk)
    pair = statistics.median(d["step"] / r["step"] for r, d in zip(t_ram, t_disk))
    pair_flush = statistics.median((d["step"] + per_step_flush) / r["step"] for r, d in zip(t_ram, t_disk))
    print(f"\n{name}: {len(t_ram)} step pairs; final flush {flush_s:.3f} s (= {1000 * per_step_flush:.0f} ms per "
          f"step), then fsync {fsync_s:.3f} s")
    rows = [[who, *(f"{med[who.lower()][p]:.3f}" for p in PHASES), f"{min(t['step'] for t in ts):.3f}"]
            for who, ts in (("RAM", t_ram), ("disk", t_disk))]
    print(common.table(["table", "forward (s)", "backward (s)", "update (s)", "step, median (s)", "min (s)"], rows,
                       align="lrrrrr"))
    print(f"disk / RAM: ratio of median steps {100 * (med['disk']['step'] / med['ram']['step'] - 1):+.1f}%; "
          f"median of pair ratios {100 * (pair - 1):+.1f}%, with the amortised flush {100 * (pair_flush - 1):+.1f}%")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4.2)
    p.add_argument("--steps", type=int, default=16, help="step pairs per regime")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--buffer-mib", type=int, default=256, help="disk table write-back buffer (engram_write_buffer_mib)")
    a = p.parse_args()
    print(common.header("seekv4 Engram table offload", __file__, torch.get_num_threads(), sys.argv[1:]))
    torch.manual_seed(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # killed: still remove the 4 GiB file (finally below)
    tmp = tempfile.mkdtemp(prefix="seekv4_engram_")
    try:
        ram = SeekV4ForCausalLM(config(a.gib)).train()
        disk = SeekV4ForCausalLM(config(a.gib, engram_storage="disk", engram_table_dir=tmp,
                                        engram_write_buffer_mib=a.buffer_mib)).train()
        disk.load_state_dict(ram.state_dict())  # same weights; the table copy goes into the mapped file
        table = disk.model.layers[1].engram.table
        table_bytes = table.weight.numel() * 4
        other = sum(p.numel() * 4 for n, p in ram.named_parameters() if "engram.table" not in n)
        print(f"table: {table.num_rows:,} rows x {table.dim} fp32 = {table_bytes / 2**30:.2f} GiB (file "
              f"{os.path.getsize(table.path) / 2**30:.2f} GiB); all other parameters: {other / 2**20:.1f} MiB; "
              f"write buffer {table._capacity:,} rows")
        print(f"step = forward + backward + row-wise Adagrad update of the touched rows; batch {a.batch} x seq {a.seq}")
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(3, 4096, (a.batch, a.seq), generator=gen) for _ in range(2 * a.steps + 1)]
        step(ram, batches[0]), step(disk, batches[0])  # warm-up
        table.flush()
        # the mapped file is in the page cache (written by the load above)
        report("file in page cache", *run_regime(ram, disk, batches[1:a.steps + 1]))
        os.sync()
        fd = os.open(table.path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: rows now come from the disk itself
        os.close(fd)
        report("file evicted (reads hit the disk)", *run_regime(ram, disk, batches[a.steps + 1:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    main()
