"""Long-context benchmark of DeepSeek-V4 attention in seekv4 (CPU, float32, batch 1).

Model: preset `tiny-deepseek-v4-flash` with max_position_embeddings=131072, random weights (seed 0): 4 layers of
V4 attention (sliding window 32 / CSA: 4:1 compression + lightning indexer top-16 / HCA: 32:1 compression / CSA),
mHC residuals (4 streams), hash-routed MoE in layer 0 and score-routed MoE after it. Every run is
`model(input_ids, use_cache=True, logits_to_keep=1)` under torch.inference_mode. Sections (one run prints them all):

  1. prefill: seekv4 prefill at --lengths: total time; time in `V4Attention.forward` (all of attention), in the CSA
              indexer selection (`V4Indexer.select`: scores against every visible compressed entry + top-k), in
              the main attention kernel (`sparse_attention` as called from `attention_v4`) and in the compressors
              (`Compressor.forward`: the attention's KV compressors of CSA/HCA layers + the CSA indexers' own
              compressors, shown split as kv + index); their shares of the prefill; the peak-RSS increase. Stops
              at the first length that fails (MemoryError / RuntimeError / killed / timeout) or whose time,
              extrapolated quadratically from the previous length, exceeds --max-point-s.
  2. port:    transformers `DeepseekV4ForCausalLM` (random, seed 0, its default `eager` attention, which
              materialises the [heads, S, S + S/m] attention logits) built from the transformers twin of the preset
              (PORT_CONFIG: same function; the converted config equals the preset's except the unused dense
              `intermediate_size`), with random hash table / router biases / sinks / compressor position biases,
              vs `seekv4.convert.from_transformers` of it (same weights), at --port-lengths, timed as interleaved
              pairs in one process (port first in pair 0); ratio = port / seekv4 (> 1: seekv4 faster). A port
              run that raises (MemoryError, or RuntimeError such as "can't allocate memory") is recorded and the
              seekv4 side still measured in the same worker; if the worker dies (killed, --port-timeout), the
              seekv4 side is re-measured alone in a fresh worker. After a port failure, larger lengths measure
              the seekv4 side only. The seekv4 peak RSS here is measured in the same process after the port's
              runs (memory the port freed may be reused): section 1 has the clean figure.
  3. decode:  ms/token of the seekv4 model at --decode-contexts: prefill each context once, then 16 single-token
              steps per context with the returned cache, the contexts' steps interleaved; median per step (with
              the select / kernel / compressor parts). Ratio largest / smallest context (target <= 2x).

Every point runs in a fresh subprocess (`--worker`); peak RSS, the matmul probe and the timers are bench/common.py's
(timers nest: select/kernel/compressors are inside the attention time). Before measuring, each worker does one
256-token warm-up prefill per model. Workers cap their address-space growth at --mem-limit-gib (RLIMIT_AS; default:
MemAvailable at start - 1 GiB) so an out-of-memory point fails with an allocation error in that worker instead of
waking the OOM killer on a shared machine. Prefill and decode loops are bench/long_context.py's. The output starts
with the CPU model and ISA the figures were measured on.

    python bench/long_context_v4.py                 # full run
    python bench/long_context_v4.py --quick         # smoke run (tiny lengths, ~1 min)
    python bench/long_context_v4.py --sections prefill --lengths 131072 --max-point-s 7200
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import long_context as lc  # noqa: E402

import torch  # noqa: E402

PRESET = "tiny-deepseek-v4-flash"
MAX_POS = lc.MAX_POS  # 131072
DECODE_STEPS = lc.DECODE_STEPS  # 16
WARMUP_TOKENS = lc.WARMUP_TOKENS  # 256
PORT_CONFIG = dict(  # the transformers twin of the preset (see tests/test_parity_deepseek_v4.py)
    vocab_size=256, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16,
    q_lora_rank=48, o_groups=2, o_lora_rank=32, sliding_window=32, index_n_heads=4, index_head_dim=16, index_topk=16,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
    scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0, hc_mult=4,
    compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
                 "compressed_sparse_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe", "moe"], max_position_embeddings=MAX_POS,
    # main layers: default RoPE θ=1e4; compressed layers: YaRN (factor 16, orig. 8192), θ=160000, attention_factor 1
    rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192,
                     "beta_fast": 32, "beta_slow": 1},
    rope_theta=10000.0, compress_rope_theta=160000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
V4_FILES = ("modeling/attention_v4.py", "modeling/compressor.py", "modeling/indexer.py", "modeling/indexer_kernel.py",
            "modeling/indexer_topk.c", "modeling/sparse_attention.py", "modeling/residual.py", "modeling/moe.py",
            "modeling/modeling_seekv4.py", "modeling/sparsity.py")
TIMERS = common.Timers()
DECODE_PARTS = ("select", "kernel", "compress_kv", "compress_index", "attn")


# ---- worker side -----------------------------------------------------------------------------------

def install_timers():
    import seekv4.modeling.attention_v4 as attention_v4
    from seekv4.modeling.compressor import Compressor

    attention_v4.V4Attention.forward = TIMERS.wrap(attention_v4.V4Attention.forward, "attn")
    attention_v4.V4Indexer.select = TIMERS.wrap(attention_v4.V4Indexer.select, "select")
    attention_v4.sparse_attention = TIMERS.wrap(attention_v4.sparse_attention, "kernel")
    forward = Compressor.forward

    def timed_forward(self, *args, **kwargs):  # key "compress_index" for the CSA indexers' compressors (tagged)
        t0 = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            TIMERS.times[getattr(self, "_bench_key", "compress_kv")] += time.perf_counter() - t0

    Compressor.forward = timed_forward


def tag_index_compressors(model):
    from seekv4.modeling.attention_v4 import V4Indexer

    for m in model.modules():
        if isinstance(m, V4Indexer):
            m.compressor._bench_key = "compress_index"
    return model


def build_seekv4(indexer: str):
    import seekv4

    torch.manual_seed(0)
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS, indexer_implementation=indexer)
    return tag_index_compressors(seekv4.SeekV4ForCausalLM(cfg).eval())


def randomise_port(src) -> None:
    """Random hash table, router biases, sinks and compressor biases, as in a trained checkpoint."""
    with torch.no_grad():
        for layer in src.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):
                n, k = gate.tid2eid.shape
                gate.tid2eid.copy_(torch.stack([torch.randperm(PORT_CONFIG["n_routed_experts"])[:k] for _ in range(n)]))
            else:
                gate.e_score_correction_bias.normal_(0, 0.05)
            layer.self_attn.sinks.normal_()
            for module in layer.self_attn.modules():
                if hasattr(module, "position_bias"):
                    module.position_bias.normal_()


def build_port(indexer: str):
    """Port first (seed 0), then convert it: both sides compute the same function with the same weights."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    import seekv4
    from seekv4.convert import from_transformers

    torch.manual_seed(0)
    src = DeepseekV4ForCausalLM(DeepseekV4Config(**PORT_CONFIG)).float().eval()
    randomise_port(src)
    ours = from_transformers(src).eval()
    ref = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS).to_dict()
    # intermediate_size is unused by an all-MoE model; the FP8 block only matters with kv_cache_dtype=fp8_e4m3
    diff = {k for k, v in ours.config.to_dict().items() if ref.get(k) != v}
    diff -= {"intermediate_size", "kv_cache_fp8_block"}
    assert not diff, f"port config differs from preset {PRESET}: {diff}"
    ours.config.indexer_implementation = indexer
    return src, tag_index_compressors(ours)


def worker_prefill(indexer: str, length: int, repeats: int) -> dict:
    install_timers()
    return lc.measure_prefill(build_seekv4(indexer), length, repeats, TIMERS)


def timed_pairs(models: dict, length: int, repeats: int, port_error: str | None):
    """Interleaved pairs (port first in pair 0, then alternating); peak RSS of each side's first run.
    A port run that raises stops the port; the seekv4 side keeps its `repeats` runs."""
    ids = lc.ids_of(length)
    times, peak = {"port": [], "seekv4": []}, {}
    with torch.inference_mode():
        for name, m in models.items():
            if name == "seekv4" or port_error is None:
                lc.prefill(m, lc.ids_of(WARMUP_TOKENS))
        for i in range(repeats):
            for name in (("port", "seekv4") if i % 2 == 0 else ("seekv4", "port")):
                if name == "port" and port_error is not None:
                    continue
                base = common.reset_peak()
                t0 = time.perf_counter()
                try:
                    out = lc.prefill(models[name], ids)
                except (MemoryError, RuntimeError) as e:
                    if name != "port":
                        raise
                    port_error = common.short_error(e)
                    gc.collect()
                    continue
                times[name].append(time.perf_counter() - t0)
                peak.setdefault(name, common.peak_mib_since(base))
                del out
    return times, peak, port_error


def worker_port(indexer: str, length: int, repeats: int, skip_port: bool) -> dict:
    src, ours = build_port(indexer)
    p0 = common.matmul_gflops()
    times, peak, port_error = timed_pairs({"port": src, "seekv4": ours}, length, repeats,
                                          "skipped" if skip_port else None)
    res = {"n": repeats, "seekv4": statistics.median(times["seekv4"]), "seekv4_peak_mib": peak.get("seekv4"),
           "probe": (p0 + common.matmul_gflops()) / 2, "times": times}
    if port_error is None:
        ratios = [a / b for a, b in zip(times["port"], times["seekv4"])]
        res.update(port=statistics.median(times["port"]), ratio=statistics.median(ratios),
                   port_peak_mib=peak.get("port"))
    else:
        res["port_error"] = port_error
    return res


def worker_decode(indexer: str, contexts: list[int]) -> dict:
    install_timers()
    p0 = common.matmul_gflops()
    per, prefill_s = lc.decode_steps(build_seekv4(indexer), contexts, TIMERS)
    res = {}
    for c in contexts:
        med = common.median_of(per[c])
        res[str(c)] = {"ms": med["total"] * 1e3, "prefill_s": prefill_s[c],
                       **{f"{k}_ms": med.get(k, 0.0) * 1e3 for k in DECODE_PARTS}}
    return {"contexts": res, "probe": (p0 + common.matmul_gflops()) / 2}


def worker_main(job: dict) -> None:
    import seekv4.modeling  # noqa: F401  (import first, then hash what was imported)

    code = common.code_hash(V4_FILES)
    torch.set_num_threads(job["threads"])
    common.limit_memory(job.get("mem_limit_gib", 0))
    try:
        if job["what"] == "prefill":
            out = worker_prefill(job["indexer"], job["length"], job["repeats"])
        elif job["what"] == "port":
            out = worker_port(job["indexer"], job["length"], job["repeats"], job.get("skip_port", False))
        else:
            out = worker_decode(job["indexer"], job["contexts"])
    except (MemoryError, RuntimeError) as e:
        out = {"error": common.short_error(e)}
    out["code"] = code
    common.emit_result(out)


# ---- driver side -----------------------------------------------------------------------------------

@dataclass
class Plan:
    sections: list[str]
    lengths: list[int]
    port_lengths: list[int]
    decode_contexts: list[int]
    port_repeats: int | None
    max_point_s: float
    port_timeout: float
    quick: bool
    base: dict  # fields of every worker job: threads, mem_limit_gib, indexer
    env: dict

    def repeats(self, n: int) -> int:
        return 1 if self.quick else lc.repeats_for(n)


def run(plan: Plan, job: dict, timeout: float) -> dict:
    r = common.run_worker(__file__, {**plan.base, **job}, timeout, plan.env)
    common.log(f"{job['what']} {job.get('length', job.get('contexts', ''))} -> {common.brief(r)}")
    return r


def run_prefill_points(plan: Plan) -> tuple[dict, str | None]:
    pre = {}
    for n in plan.lengths:
        if pre:
            prev = list(pre)[-1]
            pred = pre[prev]["total"] * (n / prev) ** 2 * plan.repeats(n)
            if pred > plan.max_point_s:
                return pre, f"stopped before {common.fk(n)}: predicted {pred:.0f} s > --max-point-s " \
                            f"{plan.max_point_s:.0f}"
        pre[n] = run(plan, {"what": "prefill", "length": n, "repeats": plan.repeats(n)},
                     plan.max_point_s * plan.repeats(n) + 120)
        if "error" in pre[n]:
            return pre, f"failed at {common.fk(n)}: {pre[n]['error']}"
    return pre, None


def run_port_points(plan: Plan) -> dict:
    """After a port failure, larger lengths measure the seekv4 side only; a worker that died in (or around) the
    port is re-run for the seekv4 side alone."""
    port, port_failed = {}, None
    for n in plan.port_lengths:
        reps = plan.port_repeats or (3 if plan.quick else lc.repeats_for(n) if n < 16384 else 1)
        job = {"what": "port", "length": n, "repeats": reps, "skip_port": port_failed is not None}
        r = run(plan, job, plan.max_point_s * reps + 120 if port_failed else plan.port_timeout)
        if "error" in r and not job["skip_port"]:
            err = r["error"]
            r = run(plan, {**job, "skip_port": True}, plan.max_point_s * reps + 120)
            r["port_error"] = err
        elif job["skip_port"]:
            r["port_error"] = f"skipped (port failed at {common.fk(port_failed)})"
        port[n] = r
        if "port_error" in r and port_failed is None:
            port_failed = n
        if "error" in r:  # the seekv4 side failed too
            break
    return port


def _t(x: float) -> str:
    return f"{x:,.3f}" if x < 100 else f"{x:,.1f}"


def prefill_table(pre: dict, stop: str | None) -> str:
    rows, prev = [], None
    for n, r in pre.items():
        if "error" in r:
            rows.append([common.fk(n)] + ["-"] * 11 + [r["error"]])
            continue
        t = r["total"]
        part = {k: r.get(k, 0.0) for k in ("attn", "select", "kernel", "compress_kv", "compress_index")}
        comp = part["compress_kv"] + part["compress_index"]
        rows.append([common.fk(n), _t(t), _t(part["attn"]), common.pct(part["attn"], t), _t(part["select"]),
                     common.pct(part["select"], t), _t(part["kernel"]), common.pct(part["kernel"], t),
                     f"{_t(comp)} ({_t(part['compress_kv'])} + {_t(part['compress_index'])})", common.pct(comp, t),
                     f"{max(r['peak_mib'], 0):,.0f}", f"{t / pre[prev]['total']:.2f}x ({n // prev}x tokens)"
                     if prev else "-", f"n={r['n']}, probe {r['probe']:.0f} GFLOP/s"])
        prev = n
    ok = [n for n, r in pre.items() if "error" not in r]
    headers = ["tokens", "prefill (s)", "V4 attention (s)", "attn share", "CSA indexer select (s)", "select share",
               "sparse kernel (s)", "kernel share", "compressors kv + index (s)", "compressor share",
               "peak RSS incr. (MiB)", "time ratio vs prev. length", "notes"]
    return common.table(headers, rows) + \
        f"\n\nLargest length measured: {common.fk(max(ok)) if ok else '-'} ({stop or 'all requested lengths ran'})"


def port_table(port: dict) -> str:
    rows = []
    for n, r in port.items():
        if "error" in r:
            rows.append([common.fk(n)] + ["-"] * 5 + [f"port: {r.get('port_error', '-')}; seekv4: {r['error']}"])
            continue
        how = "seekv4 runs" if "port_error" in r else "interleaved pairs"
        note = f"n={r['n']} {how}, probe {r['probe']:.0f} GFLOP/s"
        ours = f"{max(r['seekv4_peak_mib'], 0):,.0f}"
        if "port_error" in r:
            rows.append([common.fk(n), f"port: {r['port_error']}", _t(r["seekv4"]), "-", "-", ours, note])
        else:
            rows.append([common.fk(n), _t(r["port"]), _t(r["seekv4"]), f"{r['ratio']:.2f}x",
                         f"{max(r['port_peak_mib'], 0):,.0f}", ours, note])
    headers = ["tokens", "port prefill (s)", "seekv4 prefill (s)", "ratio port/seekv4 (>1: seekv4 faster)",
               "port peak RSS incr. (MiB)", "seekv4 peak RSS incr. (MiB)", "notes"]
    return common.table(headers, rows)


def decode_table(dec: dict, contexts: list[int]) -> str:
    if "error" in dec:
        return f"failed: {dec['error']}"
    d = dec["contexts"]
    c0, c1 = contexts[0], contexts[-1]
    rows = [[common.fk(c), f"{r['ms']:.2f}", f"{r['attn_ms']:.2f}", f"{r['select_ms']:.2f}", f"{r['kernel_ms']:.2f}",
             f"{r['compress_kv_ms'] + r['compress_index_ms']:.2f}", f"{r['ms'] / d[str(c0)]['ms']:.2f}x",
             _t(r["prefill_s"])] for c in contexts for r in [d[str(c)]]]
    headers = ["context", "ms/token", "V4 attention ms/token", "indexer select ms/token", "sparse kernel ms/token",
               "compressors ms/token", "ratio vs smallest context", "context prefill (s)"]
    ratio = d[str(c1)]["ms"] / d[str(c0)]["ms"]
    return common.table(headers, rows) + (
        f"\n\ndecode ms/token {common.fk(c1)} / {common.fk(c0)}: {ratio:.2f}x (target <= 2x: "
        f"{'**met**' if ratio <= 2 else '**NOT met**'}); probe {dec['probe']:.0f} GFLOP/s")


def parse_plan(argv) -> tuple[argparse.Namespace, Plan]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run at tiny lengths (~1 min)")
    p.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 4k 8k 16k 32k 64k 128k)")
    p.add_argument("--port-lengths", type=int, nargs="+", help="port comparison lengths (default 4k 8k 16k)")
    p.add_argument("--decode-contexts", type=int, nargs="+", help="decode contexts (default 2048 32768)")
    p.add_argument("--sections", nargs="+", default=["prefill", "port", "decode"],
                   choices=["prefill", "port", "decode"])
    p.add_argument("--max-point-s", type=float, default=3600.0,
                   help="per prefill point: skip lengths whose quadratic extrapolation exceeds this; also the timeout")
    p.add_argument("--port-repeats", type=int,
                   help="interleaved pairs per port point (default: 3 up to 8k, 1 from 16k)")
    p.add_argument("--port-timeout", type=float, default=1200.0, help="timeout per port point (s)")
    p.add_argument("--mem-limit-gib", type=float,
                   help="cap on each worker's address-space growth (default: MemAvailable at start - 1; 0: none)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--indexer", choices=["fused", "eager"], default="fused",
                   help="config.indexer_implementation of seekv4's CSA layers (port rows are unaffected)")
    p.add_argument("--thp", action="store_true", help="workers run with THP_MEM_ALLOC_ENABLE=1 (see long_context.py)")
    a = p.parse_args(argv)
    q = a.quick
    mem_gib = a.mem_limit_gib if a.mem_limit_gib is not None else max(common.mem_available_gib() - 1, 1.0)
    plan = Plan(
        sections=a.sections,
        lengths=a.lengths or ([256, 512, 1024] if q else [4096, 8192, 16384, 32768, 65536, 131072]),
        port_lengths=a.port_lengths or ([256, 512] if q else [4096, 8192, 16384]),
        decode_contexts=sorted(a.decode_contexts or ([128, 1024] if q else [2048, 32768])),
        port_repeats=a.port_repeats, max_point_s=a.max_point_s, port_timeout=a.port_timeout, quick=q,
        base={"threads": a.threads, "mem_limit_gib": mem_gib, "indexer": a.indexer},
        env={"THP_MEM_ALLOC_ENABLE": "1"} if a.thp else {},
    )
    return a, plan


def print_header(plan: Plan, argv) -> str:
    import seekv4

    threads, mem_gib = plan.base["threads"], plan.base["mem_limit_gib"]
    print(common.header("seekv4 DeepSeek-V4 attention long-context benchmark", __file__, threads, argv))
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *V4_FILES], capture_output=True, text=True,
                           cwd=os.path.dirname(seekv4.__file__)).stdout.strip()
    code0 = common.code_hash(V4_FILES)
    print(f"MemAvailable {common.mem_available_gib():.1f} GiB, worker address-space cap "
          f"{'+%.1f GiB' % mem_gib if mem_gib > 0 else 'none'}; V4 source hash {code0}"
          f"{' (uncommitted V4 changes)' if dirty else ''} ({', '.join(V4_FILES)})")
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS)
    print(f"model: preset {PRESET} (max_position_embeddings={MAX_POS}; attention {cfg.attention_sparsity}, window "
          f"{cfg.sliding_window}, CSA {cfg.csa_compress_ratio}:1 top-{cfg.index_topk}, HCA {cfg.hca_compress_ratio}:1, "
          f"ffn {cfg.ffn_types}, residual {cfg.residual_kind} x{cfg.hc_mult}), "
          f"indexer_implementation={plan.base['indexer']}, {'THP_MEM_ALLOC_ENABLE=1, ' if plan.env else ''}"
          "float32, batch 1, inference_mode, use_cache=True, logits_to_keep=1\n")
    return code0


def main(argv=None):
    a, plan = parse_plan(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    torch.set_num_threads(plan.base["threads"])
    t_start = time.perf_counter()
    code0 = print_header(plan, sys.argv[1:] if argv is None else argv)
    pre, stop = run_prefill_points(plan) if "prefill" in plan.sections else ({}, None)
    port = run_port_points(plan) if "port" in plan.sections else {}
    dec = run(plan, {"what": "decode", "contexts": plan.decode_contexts}, plan.max_point_s + 600) \
        if "decode" in plan.sections else None
    if pre:
        common.section(f"1. V4 prefill (seekv4, {PRESET})", prefill_table(pre, stop))
    if port:
        common.section("2. transformers DeepseekV4ForCausalLM port vs seekv4 (converted, same weights)",
                       port_table(port))
    if dec:
        common.section(f"3. V4 decode ({DECODE_STEPS} single-token steps per context, interleaved, median)",
                       decode_table(dec, plan.decode_contexts))
    seen = {r.get("code") for r in [*pre.values(), *port.values(), dec or {}] if r.get("code")}
    seen.add(common.code_hash(V4_FILES))
    print(f"WARNING: the V4 source files changed during the run (hashes {sorted(seen)} vs {code0} at start); rows "
          "from different code versions are mixed." if seen != {code0} else
          f"V4 source files unchanged during the run (hash {code0}).")
    print(f"total wall time {time.perf_counter() - t_start:,.0f} s")


if __name__ == "__main__":
    main()
