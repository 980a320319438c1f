"""Per-pair costs behind the DSA vs dense analysis in bench/RESULTS.md (CPU, float32, one layer, batch 1).

    python bench/indexer_costs.py [--length 32768] [--threads 2]

Prints, for the index shape of `--shape h256` in bench/long_context.py (2 index heads x 64), in ns per causal
query-key pair (S·(S+1)/2 pairs); the dense attention it is compared with in RESULTS is long_context's
"dense main attn" column (4 layers):
  1. lightning-indexer selection (`LightningIndexer.select`, random inputs) and the share of its batched
     score matmul (`aten::bmm`, from torch.profiler); then the same selection with indexer_implementation="fused"
     (modeling/indexer_kernel.py: bf16 products on AMX where present, streaming top-k) and how many of the eager
     float32 picks it keeps;
  2. bf16 (AMX) scores vs float32 on one [256 queries x 16384 keys] chunk: time of the score + weighted sum, and
     how many of the float32 top-16 picks the bf16 scores keep;
  3. the sparse kernel alone at the `tiny` shape (latent 32 + RoPE 8, 4 heads, top-16) at 8k and 32k;
  4. the fused kernel's FLOP rate on one thread (causal selection of min(S, 8192) queries, counting the q·k
     multiply-adds only: 2·Hi·D FLOPs per causal pair) next to a one-thread float32 `torch.mm` probe at the
     indexer's matmul shape ([256·Hi, D] x [D, T], T = that length), and their ratio, for the section-1 index
     shape (2 heads x 64) and tiny-seed-v4's (4 x 16).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

G = torch.Generator().manual_seed(0)


def best(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the picks in a [L, k] that b [L, k] also picks (per row, as sets)."""
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b)) / a.numel()


def selection_costs(s: int) -> None:
    """Section 1: eager selection (and its score-matmul share) vs the fused kernel, per causal pair."""
    from torch.profiler import profile

    from seekv4.modeling import indexer_kernel
    from seekv4.modeling.indexer import LightningIndexer

    pairs = s * (s + 1) / 2
    cfg = SimpleNamespace(index_n_heads=2, index_head_dim=64, index_rope_head_dim=32, index_topk=16, hidden_size=256,
                          indexer_implementation="eager")
    ix = LightningIndexer(cfg, 128)
    q, w = torch.randn(1, s, 2, 64, generator=G), torch.randn(1, s, 2, generator=G)
    keys, limit = torch.randn(1, s, 64, generator=G), torch.arange(1, s + 1)[None]
    sel = best(lambda: ix.select(q, w, keys, limit, None), n=1)
    with profile() as prof:
        ix.select(q, w, keys, limit, None)
    total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
    bmm_us = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::bmm")
    print(f"1. indexer select: {sel:.2f} s = {sel / pairs * 1e9:.2f} ns/pair; score matmul share "
          f"{bmm_us / total_us:.0%} = {sel * bmm_us / total_us / pairs * 1e9:.2f} ns/pair")
    eager = ix.select(q, w, keys, limit, None)
    cfg.indexer_implementation = "fused"
    fused_s = best(lambda: ix.select(q, w, keys, limit, None), n=3)
    kept = overlap(eager[0], ix.select(q, w, keys, limit, None)[0])
    print(f"   fused select ({'AMX' if indexer_kernel.uses_amx() else 'portable loop'}): {fused_s:.2f} s = "
          f"{fused_s / pairs * 1e9:.2f} ns/pair ({sel / fused_s:.1f}x faster); keeps {kept:.1%} of the eager picks")


def bf16_scores(lc: int = 256, t: int = 16384) -> None:
    """Section 2: bf16 vs float32 scores of one query chunk, and the picks bf16 keeps."""
    qc, wc = torch.randn(1, lc, 2, 64, generator=G), torch.randn(1, lc, 2, generator=G)
    kc = torch.randn(1, t, 64, generator=G)
    heads32, out = torch.empty(1, 2 * lc, t), torch.empty(1, lc, t)
    heads16, tmp = torch.empty(1, 2 * lc, t, dtype=torch.bfloat16), torch.empty(1, lc, t)

    def scores(heads, qq, kk, convert):
        torch.bmm(qq, kk, out=heads)
        hv = heads.view(1, 2, lc, t).relu_()
        for h in range(2):
            x = tmp.copy_(hv[:, h]) if convert else hv[:, h]
            if h == 0:
                torch.mul(x, wc[:, :, 0, None], out=out)
            else:
                out.addcmul_(x, wc[:, :, h, None])
        return out

    q32, k32 = qc.transpose(1, 2).reshape(1, 2 * lc, 64), kc.transpose(1, 2)
    f32 = best(lambda: scores(heads32, q32, k32, False))
    top32 = torch.topk(scores(heads32, q32, k32, False), 16).indices
    q16, k16 = q32.bfloat16(), k32.bfloat16()
    f16 = best(lambda: scores(heads16, q16, k16, True))
    kept = overlap(top32[0], torch.topk(scores(heads16, q16, k16, True), 16).indices[0])
    print(f"2. scores of [{lc} x {t}]: float32 {f32 * 1e3:.1f} ms, bf16 matmul + float32 sum {f16 * 1e3:.1f} ms "
          f"({f32 / f16 - 1:+.0%} faster); bf16 keeps {kept:.1%} of the float32 top-16 picks")


def sparse_kernel_costs() -> None:
    """Section 3: the sparse attention kernel alone at the tiny shape, 8k vs 32k."""
    from seekv4.modeling.sparse_attention import sparse_attention

    res = []
    for n in (8192, 32768):
        qn, qr = torch.randn(1, n, 1, 4, 32, generator=G), torch.randn(1, n, 1, 4, 8, generator=G)
        lat, rope = torch.randn(1, n, 32, generator=G), torch.randn(1, n, 8, generator=G)
        idx = (torch.rand(1, n, 16, generator=G) * (torch.arange(n)[None, :, None] + 1)).long()
        res.append(best(lambda: sparse_attention([qn, qr], [lat, rope], 0, idx, 0.1)))
    print(f"3. sparse kernel, tiny shape, one layer: 8k {res[0] * 1e3:.0f} ms, 32k {res[1] * 1e3:.0f} ms "
          f"({res[1] / res[0]:.2f}x for 4x tokens)")


def kernel_flop_rate(s: int, threads: int) -> None:
    """Section 4: the fused kernel's one-thread FLOP rate next to a one-thread fp32 torch.mm at its matmul shape."""
    from seekv4.modeling import indexer_kernel

    n = min(s, 8192)
    torch.set_num_threads(1)  # the kernel splits queries over torch's thread count: one thread for both sides
    try:
        for hi, d in ((2, 64), (4, 16)):
            qn, wn = torch.randn(1, n, hi, d, generator=G), torch.randn(1, n, hi, generator=G)
            kn, lim = torch.randn(1, n, d, generator=G), torch.arange(1, n + 1)[None]
            fused_t = best(lambda: indexer_kernel.fused_topk(qn, wn, kn, lim, None, 16))
            fused_rate = n * (n + 1) / 2 * 2 * hi * d / fused_t / 1e9
            lhs, rhs = torch.randn(256 * hi, d, generator=G), torch.randn(d, n, generator=G)
            prod = torch.empty(256 * hi, n)
            mm_rate = 2 * 256 * hi * d * n / best(lambda: torch.mm(lhs, rhs, out=prod), n=5) / 1e9
            print(f"4. one thread, {hi} index heads x {d}, {n} causal queries: fused kernel {fused_rate:.1f} GFLOP/s "
                  f"(q·k only), fp32 torch.mm [{256 * hi} x {d}] x [{d} x {n}] {mm_rate:.1f} GFLOP/s: "
                  f"{fused_rate / mm_rate:.0%} of the probe (target >= 60%)")
    finally:
        torch.set_num_threads(threads)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--march", help="build the fused kernel for this -march instead of the host's (e.g. haswell: "
                                   "AVX2 only, no AVX-512/AMX, the code path of an AVX2-only CPU)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    common.build_kernel_for(a.march)
    print(common.header("indexer / dense attention costs", __file__, a.threads, sys.argv[1:] if argv is None else argv))
    print(f"S={a.length}; fused kernel built for -march={a.march or 'native'}\n")
    selection_costs(a.length)
    bf16_scores()
    sparse_kernel_costs()
    kernel_flop_rate(a.length, a.threads)


if __name__ == "__main__":
    main()
