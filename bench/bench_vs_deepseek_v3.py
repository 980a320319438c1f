"""Benchmark seekv4 against the transformers `DeepseekV3ForCausalLM` port at the same tiny config (CPU, float32).

Both models compute the same function: the seekv4 one is converted from the transformers one with
`seekv4.convert.from_transformers` (same weights); logit agreement is checked at startup.

Measured, each as the median of a few repeats after one warm-up (time.perf_counter):
  1. prefill: batch 1 forward at each --lengths, use_cache=True, logits_to_keep=1 (as generate does);
  2. decode: tokens/s of 32 single-token steps after prefilling each --decode-contexts (teacher-forced on
     one fixed token sequence shared by both models; each model gets its own cache, deep-copied per repeat);
  3. training: one step (forward with labels, backward, AdamW) at batch x seq for each --train-shapes.
Optional --memory: peak-RSS increase of one prefill per length, each measured in a fresh subprocess.

ratio = transformers time / seekv4 time (decode: seekv4 tok/s / transformers tok/s), so > 1 means seekv4 is faster.

    python bench/bench_vs_deepseek_v3.py                 # full run (~10 min on 2 CPU cores)
    python bench/bench_vs_deepseek_v3.py --quick         # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from seekv4.convert import from_transformers

CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=40000,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
DECODE_STEPS = 32


def build_models(seed: int = 0):
    torch.manual_seed(seed)
    src = DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG)).float().eval()
    with torch.no_grad():  # non-zero balancing biases, as in a trained checkpoint
        for layer in src.model.layers[CONFIG["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ours = from_transformers(src).eval()
    return src, ours


def ids_of(length: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG["vocab_size"], (batch, length), generator=g)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeats_for(n_tokens: int, repeats: int) -> int:
    """Fewer repeats at long lengths to bound the run time."""
    if n_tokens >= 8192:
        return min(repeats, 2)
    if n_tokens >= 4096:
        return min(repeats, 3)
    return repeats


# ---- 1. prefill ----------------------------------------------------------------------------------

def prefill(model, ids):
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def bench_prefill(models, length: int, repeats: int) -> dict[str, float]:
    ids = ids_of(length)
    times = {name: [] for name in models}
    with torch.inference_mode():
        for name, m in models.items():  # warm-up
            prefill(m, ids)
        for _ in range(repeats_for(length, repeats)):
            for name, m in models.items():  # interleaved so drift hits both alike
                times[name].append(timed(lambda: prefill(m, ids)))
    return {name: statistics.median(t) for name, t in times.items()}


# ---- 2. decode -----------------------------------------------------------------------------------

def decode_loop(model, cache, tokens):
    for i in range(tokens.shape[1]):
        out = model(input_ids=tokens[:, i : i + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    return out


def bench_decode(models, context: int, repeats: int) -> dict[str, float]:
    """Returns seconds for DECODE_STEPS steps (median)."""
    ids = ids_of(context + DECODE_STEPS)
    ctx, steps = ids[:, :context], ids[:, context:]
    times = {name: [] for name in models}
    with torch.inference_mode():
        caches = {name: prefill(m, ctx).past_key_values for name, m in models.items()}
        for name, m in models.items():  # warm-up
            decode_loop(m, copy.deepcopy(caches[name]), steps)
        for _ in range(repeats_for(context, repeats)):
            for name, m in models.items():
                cache = copy.deepcopy(caches[name])
                times[name].append(timed(lambda: decode_loop(m, cache, steps)))
    return {name: statistics.median(t) for name, t in times.items()}


# ---- 3. training step ----------------------------------------------------------------------------

def bench_train(models, batch: int, seq: int, repeats: int) -> dict[str, float]:
    ids = ids_of(seq, batch)
    res = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()

        step()  # warm-up (also allocates the optimizer state)
        res[name] = statistics.median(timed(step) for _ in range(repeats))
        m.eval()
        opt.zero_grad(set_to_none=True)
        del opt
    return res


# ---- optional memory (one fresh subprocess per point) ----------------------------------------------

def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _memory_child(name: str, length: int) -> None:
    """Peak RSS during one prefill minus RSS just before it (Linux: VmHWM reset via /proc/self/clear_refs)."""
    src, ours = build_models()
    model = {"transformers": src, "seekv4": ours}[name]
    del src, ours
    ids = ids_of(length)
    with torch.inference_mode():
        prefill(model, ids_of(16))  # one-time allocations (thread pools, kernels) out of the measurement
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS high-water mark to the current RSS
        base = _proc_status_kib("VmRSS")
        prefill(model, ids)
    print(json.dumps({"peak_mib": (_proc_status_kib("VmHWM") - base) / 1024}))


def measure_memory(name: str, length: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--_memory-child", name, str(length)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


# ---- main ----------------------------------------------------------------------------------------

def matmul_gflops() -> float:
    """Machine-noise indicator: fp32 GFLOP/s of a 512^3 matmul (median of 20); compare start vs end."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    return 2 * 512**3 / statistics.median(timed(lambda: a @ b) for _ in range(20)) / 1e9


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.1f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="prefill lengths")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[2048, 8192], help="decode context lengths")
    p.add_argument("--train-shapes", nargs="+", default=["4x512", "4x1024"], help="training BATCHxSEQ shapes")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (reduced automatically at >= 4096 tokens)")
    p.add_argument("--train-repeats", type=int, default=3, help="timed training steps")
    p.add_argument("--memory", action="store_true", help="also measure prefill peak-RSS increase (subprocess per point)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._memory_child:
        return _memory_child(args._memory_child[0], int(args._memory_child[1]))
    if args.quick:
        args.lengths, args.decode_contexts, args.train_shapes = [64, 128], [64], ["2x64"]
        args.repeats, args.train_repeats = 2, 2
    train_shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.train_shapes]

    t_start = time.perf_counter()
    src, ours = build_models()
    models = {"transformers": src, "seekv4": ours}
    print(f"# seekv4 vs transformers DeepseekV3ForCausalLM ({datetime.date.today()})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, torch.get_num_threads()={torch.get_num_threads()}")
    print(f"attn_implementation: transformers={src.config._attn_implementation}, "
          f"seekv4={ours.config._attn_implementation}; "
          f"transformers experts_implementation={getattr(src.config, '_experts_implementation', None)}")
    n_params = sum(p.numel() for p in src.parameters())
    print(f"matmul calibration at start: {matmul_gflops():.1f} GFLOP/s")
    print(f"config: {CONFIG} ({n_params / 1e6:.2f}M params)")
    ids = ids_of(64, 2, seed=2)
    with torch.inference_mode():
        diff = (src(ids).logits - ours(ids).logits).abs().max().item()
    print(f"parity check: max |logits diff| on [2, 64] = {diff:.2e}")
    if not diff < 1e-3:
        raise SystemExit(f"logits disagree (max abs diff {diff:.3e} >= 1e-3); refusing to benchmark")

    rows = []  # (benchmark, transformers, seekv4, ratio, extra)
    for length in args.lengths:
        r = bench_prefill(models, length, args.repeats)
        rows.append((f"prefill 1x{length} (ms)", fmt_ms(r["transformers"]), fmt_ms(r["seekv4"]),
                     r["transformers"] / r["seekv4"], f"n={repeats_for(length, args.repeats)}"))
        print(f"  done: {rows[-1][0]} {rows[-1][1:4]}", file=sys.stderr, flush=True)
    for ctx in args.decode_contexts:
        r = bench_decode(models, ctx, args.repeats)
        tps = {k: DECODE_STEPS / v for k, v in r.items()}
        rows.append((f"decode @ctx {ctx} (tok/s)", f"{tps['transformers']:,.1f}", f"{tps['seekv4']:,.1f}",
                     tps["seekv4"] / tps["transformers"], f"{DECODE_STEPS} steps, n={repeats_for(ctx, args.repeats)}"))
        print(f"  done: {rows[-1][0]} {rows[-1][1:4]}", file=sys.stderr, flush=True)
    for b, s in train_shapes:
        r = bench_train(models, b, s, args.train_repeats)
        rows.append((f"train step {b}x{s} (ms)", fmt_ms(r["transformers"]), fmt_ms(r["seekv4"]),
                     r["transformers"] / r["seekv4"], f"fwd+bwd+AdamW, n={args.train_repeats}"))
        print(f"  done: {rows[-1][0]} {rows[-1][1:4]}", file=sys.stderr, flush=True)
    if args.memory:
        for length in args.lengths:
            mem = {name: measure_memory(name, length) for name in models}
            ratio = mem["transformers"] / mem["seekv4"] if mem["seekv4"] > 0 else float("nan")
            rows.append((f"prefill 1x{length} peak RSS increase (MiB)", f"{mem['transformers']:,.0f}",
                         f"{mem['seekv4']:,.0f}", ratio, "fresh subprocess"))
            print(f"  done: {rows[-1][0]} {rows[-1][1:4]}", file=sys.stderr, flush=True)

    print(flush=True)
    print("| benchmark | transformers | seekv4 | ratio (>1: seekv4 faster) | notes |")
    print("|---|---:|---:|---:|---|")
    for name, a, b, ratio, note in rows:
        flag = " **(seekv4 slower)**" if ratio < 1 else ""
        print(f"| {name} | {a} | {b} | {ratio:.2f}x{flag} | {note} |")
    print(f"\nmatmul calibration at end: {matmul_gflops():.1f} GFLOP/s")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
