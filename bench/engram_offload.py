"""Engram table offload: forward+backward(+row-wise table update) step time with a >= 4 GiB Engram table
memory-mapped from disk vs the same table in RAM.

    python bench/engram_offload.py [--gib 4.2] [--steps 12]

The backbone is small (the table is larger than every other parameter combined). Both models share the
backbone weights; steps alternate RAM / disk so CPU contention hits both alike; the median is reported.
Two regimes for the mapped file: resident in the page cache (a table that fits in free RAM), and after
evicting it (posix_fadvise DONTNEED), so every touched row is a random 4 KiB read from the disk (a table
larger than RAM).
The table file lives in a temporary directory that is deleted at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM


def config(gib: float, **kw):
    heads, orders, dim = 8, 2, 64
    base = int(gib * 2**30 / (4 * dim * heads * orders))
    return SeekV4Config.from_preset(
        "tiny-gqa", hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=4096, engram_layer_ids=[1], engram_max_ngram_size=3, engram_n_heads=heads,
        engram_head_dim=dim, engram_vocab_size=base, engram_kernel_size=0, **kw)


UPDATE = True


def step(model, ids):
    start = time.perf_counter()
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    if UPDATE:
        model.step_engram_tables(1e-3)
    else:
        model.model.layers[1].engram.table.zero_grad()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=4.2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--no-update", action="store_true", help="time forward + backward only (no table write)")
    a = p.parse_args()
    global UPDATE
    UPDATE = not a.no_update
    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="seekv4_engram_")
    try:
        ram = SeekV4ForCausalLM(config(a.gib)).train()
        disk = SeekV4ForCausalLM(config(a.gib, engram_storage="disk", engram_table_dir=tmp)).train()
        disk.load_state_dict(ram.state_dict())  # same weights; the table copy goes into the mapped file
        table = disk.model.layers[1].engram.table
        path = table.path
        table_bytes = table.weight.numel() * 4
        other = sum(p.numel() * 4 for n, p in ram.named_parameters() if "engram.table" not in n)
        print(f"table: {table.num_rows:,} rows x {table.dim} fp32 = {table_bytes / 2**30:.2f} GiB "
              f"(file {os.path.getsize(path) / 2**30:.2f} GiB); all other parameters: {other / 2**20:.1f} MiB")
        print(f"step = forward + backward{' + row-wise table update' if UPDATE else ''}; batch {a.batch} x seq {a.seq}")
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randint(3, 4096, (a.batch, a.seq), generator=gen) for _ in range(a.steps + 2)]
        step(ram, batches[0]), step(disk, batches[0])  # warm-up
        t_ram, t_disk = [], []
        for ids in batches[1:]:  # the mapped file is in the page cache (written by the load above)
            t_ram.append(step(ram, ids))
            t_disk.append(step(disk, ids))
        os.sync()
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: rows now come from the disk itself
        os.close(fd)
        c_ram, c_disk = [], []
        for ids in batches[1:]:
            c_ram.append(step(ram, ids))
            c_disk.append(step(disk, ids))
        m_ram, m_disk = statistics.median(t_ram), statistics.median(t_disk)
        print("| table storage | median step (s) | min (s) | overhead vs RAM (median) |")
        print("|---|---|---|---|")
        print(f"| RAM (device=cpu) | {m_ram:.3f} | {min(t_ram):.3f} | - |")
        print(f"| disk, memory-mapped, file in page cache | {m_disk:.3f} | {min(t_disk):.3f} | "
              f"{100 * (m_disk / m_ram - 1):+.1f}% |")
        cm_ram, cm_disk = statistics.median(c_ram), statistics.median(c_disk)
        print(f"| disk, memory-mapped, evicted (reads hit the disk) | {cm_disk:.3f} | {min(c_disk):.3f} | "
              f"{100 * (cm_disk / cm_ram - 1):+.1f}% (RAM median in that phase {cm_ram:.3f}) |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    main()
