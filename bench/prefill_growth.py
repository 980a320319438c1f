"""Prefill growth with context length under the default config, and with each indexer implementation pinned.

    python bench/prefill_growth.py [--preset tiny-seed-v4] [--lengths 4096 16384] [--repeats 1]

Model: `--preset` (max_position_embeddings raised to the longest length if shorter), random weights (seed 0),
float32, batch 1, `model(input_ids, use_cache=True, logits_to_keep=1)` under torch.inference_mode, torch's default
thread count. Implementations (config.indexer_implementation, switched on the same model): "auto" (the default;
the line says what it resolved to on this machine), "eager" (float32 torch ops, streamed by query chunks) and
"fused" (the compiled CPU kernel). Each prints, per length, the prefill time (median of --repeats, after one
256-token warm-up prefill) and its growth over the shortest length. The header names the CPU model and ISA and a 512^3
fp32 matmul probe (GFLOP/s) before and after, since shared machines drift (bench/common.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import long_context as lc  # noqa: E402

import torch  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-seed-v4")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--implementations", nargs="+", default=["auto", "eager", "fused"])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--march", help="build the fused kernel for this -march instead of the host's (e.g. haswell: "
                                   "AVX2 only, no AVX-512/AMX, the code path of an AVX2-only CPU)")
    a = p.parse_args(argv)
    common.build_kernel_for(a.march)

    import seekv4
    from seekv4.modeling.indexer import resolve_implementation

    cfg = seekv4.SeekV4Config.from_preset(a.preset)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max(a.lengths))
    default = cfg.indexer_implementation
    torch.manual_seed(0)
    model = seekv4.SeekV4ForCausalLM(cfg).eval()
    print(common.header("prefill growth with context length", __file__, torch.get_num_threads(),
                        sys.argv[1:] if argv is None else argv))
    print(f"preset {a.preset}, default indexer_implementation={default!r} -> "
          f"{resolve_implementation(default, torch.device('cpu'))!r} here (kernel built for "
          f"-march={a.march or 'native'}); probe {common.matmul_gflops():.0f} GFLOP/s")
    print("\n| length | implementation | seconds | growth |")
    print("|---:|---|---:|---:|")
    with torch.inference_mode():
        for impl in a.implementations:
            model.config.indexer_implementation = impl
            lc.prefill(model, lc.ids_of(lc.WARMUP_TOKENS))  # builds / loads the kernel, warms the allocator
            name = f"{impl} (-> {resolve_implementation(impl, torch.device('cpu'))})" if impl == "auto" else impl
            first = None
            for length in a.lengths:
                ids = lc.ids_of(length)
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    lc.prefill(model, ids)
                    times.append(time.perf_counter() - t0)
                s = statistics.median(times)
                first = first or s
                print(f"| {length} | {name} | {s:.2f} | {s / first:.2f}x |", flush=True)
    print(f"\nprobe after: {common.matmul_gflops():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
