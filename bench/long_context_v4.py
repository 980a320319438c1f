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

Every point runs in a fresh subprocess (`--worker`), so peak RSS is per point: Linux VmHWM after resetting it
(write "5" to /proc/self/clear_refs) right before the measured prefill, minus VmRSS at that moment. Before
measuring, each worker does one 256-token warm-up prefill per model. Timers are time.perf_counter around
monkeypatched functions (CPU ops are synchronous; timers nest: select/kernel/compressors are inside the attention
time). Each point is bracketed by a 512^3 fp32 matmul probe (GFLOP/s) to show the CPU phase on shared machines:
compare absolute times only between rows with similar probes. Workers cap their address-space growth at
--mem-limit-gib (RLIMIT_AS; default: MemAvailable at start - 1 GiB) so an out-of-memory point fails with an
allocation error in that worker instead of waking the OOM killer on a shared machine.

Helpers (probe, peak RSS, timers, ids, prefill) come from bench/long_context.py.

    python bench/long_context_v4.py                 # full run
    python bench/long_context_v4.py --quick         # smoke run (tiny lengths, ~1 min)
    python bench/long_context_v4.py --sections prefill --lengths 131072 --max-point-s 7200
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
            "modeling/modeling_seekv4.py")
INDEXER = "fused"  # config.indexer_implementation of seekv4's CSA layers; set by --indexer / the worker spec
TIMES = lc.TIMES  # filled by lc._timed wrappers


# ---- worker side -----------------------------------------------------------------------------------

def install_timers():
    import seekv4.modeling.attention_v4 as attention_v4
    from seekv4.modeling.compressor import Compressor

    attention_v4.V4Attention.forward = lc._timed(attention_v4.V4Attention.forward, "attn")
    attention_v4.V4Indexer.select = lc._timed(attention_v4.V4Indexer.select, "select")
    attention_v4.sparse_attention = lc._timed(attention_v4.sparse_attention, "kernel")
    forward = Compressor.forward

    def timed_forward(self, *args, **kwargs):  # key "compress_index" for the CSA indexers' compressors (tagged)
        t0 = time.perf_counter()
        try:
            return forward(self, *args, **kwargs)
        finally:
            TIMES[getattr(self, "_bench_key", "compress_kv")] += time.perf_counter() - t0

    Compressor.forward = timed_forward


def tag_index_compressors(model):
    from seekv4.modeling.attention_v4 import V4Indexer

    for m in model.modules():
        if isinstance(m, V4Indexer):
            m.compressor._bench_key = "compress_index"
    return model


def build_seekv4():
    import seekv4

    torch.manual_seed(0)
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS, indexer_implementation=INDEXER)
    return tag_index_compressors(seekv4.SeekV4ForCausalLM(cfg).eval())


def build_port():
    """Port first (seed 0), then convert it: both sides compute the same function with the same weights."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    import seekv4
    from seekv4.convert import from_transformers

    torch.manual_seed(0)
    src = DeepseekV4ForCausalLM(DeepseekV4Config(**PORT_CONFIG)).float().eval()
    with torch.no_grad():  # random hash table, router biases, sinks, compressor biases (as in a trained checkpoint)
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
    ours = from_transformers(src).eval()
    ref = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS).to_dict()
    # intermediate_size is unused by an all-MoE model; the FP8 block only matters with kv_cache_dtype=fp8_e4m3
    diff = {k for k, v in ours.config.to_dict().items() if ref.get(k) != v} - {"intermediate_size", "kv_cache_fp8_block"}
    assert not diff, f"port config differs from preset {PRESET}: {diff}"
    ours.config.indexer_implementation = INDEXER
    return src, tag_index_compressors(ours)


def _breakdown(runs: list[dict]) -> dict:
    keys = {k for r in runs for k in r}
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def worker_prefill(length: int, repeats: int) -> dict:
    install_timers()
    return lc.measure_prefill(build_seekv4(), length, repeats)


def worker_port(length: int, repeats: int, skip_port: bool) -> dict:
    """Interleaved pairs (port first in pair 0, then alternating); peak RSS of each side's first run.
    A port run that raises stops the port; the seekv4 side keeps its `repeats` runs."""
    src, ours = build_port()
    ids = lc.ids_of(length)
    models = {"port": src, "seekv4": ours}
    times = {"port": [], "seekv4": []}
    peak = {}
    port_error = "skipped" if skip_port else None
    p0 = lc.probe_gflops()
    with torch.inference_mode():
        for name, m in models.items():
            if name == "seekv4" or port_error is None:
                lc.prefill(m, lc.ids_of(WARMUP_TOKENS))
        for i in range(repeats):
            for name in (("port", "seekv4") if i % 2 == 0 else ("seekv4", "port")):
                if name == "port" and port_error is not None:
                    continue
                base = lc.reset_peak()
                t0 = time.perf_counter()
                try:
                    out = lc.prefill(models[name], ids)
                except (MemoryError, RuntimeError) as e:
                    if name != "port":
                        raise
                    port_error = short_error(e)
                    gc.collect()
                    continue
                times[name].append(time.perf_counter() - t0)
                if name not in peak:
                    peak[name] = (lc._status_kib("VmHWM") - base) / 1024
                del out
    p1 = lc.probe_gflops()
    res = {"n": repeats, "seekv4": statistics.median(times["seekv4"]), "seekv4_peak_mib": peak.get("seekv4"),
           "probe": (p0 + p1) / 2, "times": times}
    if port_error is None:
        ratios = [a / b for a, b in zip(times["port"], times["seekv4"])]
        res.update(port=statistics.median(times["port"]), ratio=statistics.median(ratios),
                   port_peak_mib=peak.get("port"))
    else:
        res["port_error"] = port_error
    return res


def worker_decode(contexts: list[int]) -> dict:
    install_timers()
    model = build_seekv4()
    ids = lc.ids_of(max(contexts) + DECODE_STEPS)
    steps = ids[:, max(contexts):]
    p0 = lc.probe_gflops()
    with torch.inference_mode():
        lc.prefill(model, lc.ids_of(WARMUP_TOKENS))
        caches, prefill_s = {}, {}
        for c in contexts:
            t0 = time.perf_counter()
            caches[c] = lc.prefill(model, ids[:, :c]).past_key_values
            prefill_s[c] = time.perf_counter() - t0
        for c in contexts:  # warm-up step on a copy
            model(input_ids=steps[:, :1], past_key_values=copy.deepcopy(caches[c]), use_cache=True)
        per = {c: [] for c in contexts}
        for i in range(DECODE_STEPS):
            for c in (contexts if i % 2 == 0 else contexts[::-1]):
                TIMES.clear()
                t0 = time.perf_counter()
                out = model(input_ids=steps[:, i: i + 1], past_key_values=caches[c], use_cache=True)
                per[c].append({"total": time.perf_counter() - t0, **TIMES})
                caches[c] = out.past_key_values
    p1 = lc.probe_gflops()
    res = {}
    for c in contexts:
        med = _breakdown(per[c])
        res[str(c)] = {"ms": med["total"] * 1e3, "prefill_s": prefill_s[c],
                       **{f"{k}_ms": med.get(k, 0.0) * 1e3 for k in ("select", "kernel", "compress_kv",
                                                                     "compress_index", "attn")}}
    return {"contexts": res, "probe": (p0 + p1) / 2}


def short_error(e: BaseException) -> str:
    """torch's allocation failure is a RuntimeError with a long message: keep the size."""
    msg = str(e)
    m = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", msg)
    if m:
        return f"{type(e).__name__}: out of memory (a {int(m.group(1)) / 2**20:,.0f} MiB allocation failed)"
    return f"{type(e).__name__}: {msg[:200]}"


def limit_memory(gib: float) -> None:
    """Cap address-space growth of this process at `gib` GiB beyond its current size (0: no cap)."""
    if gib > 0:
        cap = lc._status_kib("VmSize") * 1024 + int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))


def worker_main(spec: dict) -> None:
    global INDEXER
    import seekv4.modeling  # noqa: F401  (import first, then hash what was imported)

    INDEXER = spec["indexer"]
    code = lc.code_hash(V4_FILES)
    torch.set_num_threads(spec["threads"])
    limit_memory(spec.get("mem_limit_gib", 0))
    try:
        if spec["what"] == "prefill":
            out = worker_prefill(spec["length"], spec["repeats"])
        elif spec["what"] == "port":
            out = worker_port(spec["length"], spec["repeats"], spec.get("skip_port", False))
        else:
            out = worker_decode(spec["contexts"])
    except (MemoryError, RuntimeError) as e:
        out = {"error": short_error(e)}
    out["code"] = code
    print("RESULT " + json.dumps(out), flush=True)


# ---- driver side -----------------------------------------------------------------------------------

def run_worker(spec: dict, timeout: float) -> dict:
    return lc.run_worker(spec, timeout, script=__file__)


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 2**20


def _brief(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k not in ("runs", "times")})


def _t(x: float) -> str:
    return f"{x:,.3f}" if x < 100 else f"{x:,.1f}"


def _s(r: dict, key: str) -> str:
    return _t(r.get(key, 0.0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run at tiny lengths (~1 min)")
    p.add_argument("--lengths", type=int, nargs="+", help="prefill lengths (default 4k 8k 16k 32k 64k 128k)")
    p.add_argument("--port-lengths", type=int, nargs="+", help="port comparison lengths (default 4k 8k 16k)")
    p.add_argument("--decode-contexts", type=int, nargs="+", help="decode contexts (default 2048 32768)")
    p.add_argument("--sections", nargs="+", default=["prefill", "port", "decode"], choices=["prefill", "port", "decode"])
    p.add_argument("--max-point-s", type=float, default=3600.0,
                   help="per prefill point: skip lengths whose quadratic extrapolation exceeds this; also the timeout")
    p.add_argument("--port-repeats", type=int, help="interleaved pairs per port point (default: 3 up to 8k, 1 from 16k)")
    p.add_argument("--port-timeout", type=float, default=1200.0, help="timeout per port point (s)")
    p.add_argument("--mem-limit-gib", type=float,
                   help="cap on each worker's address-space growth (default: MemAvailable at start - 1; 0: none)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--indexer", choices=["fused", "eager"], default="fused",
                   help="config.indexer_implementation of seekv4's CSA layers (port rows are unaffected)")
    p.add_argument("--thp", action="store_true", help="workers run with THP_MEM_ALLOC_ENABLE=1 (see long_context.py)")
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))

    q = a.quick
    lengths = a.lengths or ([256, 512, 1024] if q else [4096, 8192, 16384, 32768, 65536, 131072])
    port_lengths = a.port_lengths or ([256, 512] if q else [4096, 8192, 16384])
    decode_contexts = sorted(a.decode_contexts or ([128, 1024] if q else [2048, 32768]))
    rep = (lambda n: 1) if q else lc.repeats_for
    mem_gib = a.mem_limit_gib if a.mem_limit_gib is not None else max(_mem_available_gib() - 1, 1.0)
    torch.set_num_threads(a.threads)
    import transformers

    import seekv4

    base = {"threads": a.threads, "mem_limit_gib": mem_gib, "indexer": a.indexer}
    if a.thp:
        lc.WORKER_ENV["THP_MEM_ALLOC_ENABLE"] = "1"
    t_start = time.perf_counter()
    print(f"# seekv4 DeepSeek-V4 attention long-context benchmark ({datetime.datetime.now():%Y-%m-%d %H:%M})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, torch.get_num_threads()={a.threads}, os.cpu_count()={os.cpu_count()}, "
          f"loadavg at start {os.getloadavg()[0]:.1f}, MemAvailable {_mem_available_gib():.1f} GiB, "
          f"worker address-space cap {'+%.1f GiB' % mem_gib if mem_gib > 0 else 'none'}")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *V4_FILES], capture_output=True, text=True,
                           cwd=os.path.dirname(seekv4.__file__)).stdout.strip()
    code0 = lc.code_hash(V4_FILES)
    print(f"repo HEAD {git or '?'}{' + uncommitted V4 changes' if dirty else ''}; V4 source hash {code0} "
          f"({', '.join(V4_FILES)})")
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS)
    print(f"model: preset {PRESET} (max_position_embeddings={MAX_POS}; attention {cfg.attention_sparsity}, window "
          f"{cfg.sliding_window}, CSA {cfg.csa_compress_ratio}:1 top-{cfg.index_topk}, HCA {cfg.hca_compress_ratio}:1, "
          f"ffn {cfg.ffn_types}, residual {cfg.residual_kind} x{cfg.hc_mult}), indexer_implementation={a.indexer}, "
          f"{'THP_MEM_ALLOC_ENABLE=1, ' if a.thp else ''}"
          f"float32, batch 1, inference_mode, "
          f"use_cache=True, logits_to_keep=1; command: python bench/long_context_v4.py {' '.join(sys.argv[1:])}")
    print()

    pre, port, dec = {}, {}, None
    stop = None
    # ---- 1: prefill -----------------------------------------------------------------------------------
    if "prefill" in a.sections:
        prev = None
        for n in lengths:
            if prev is not None:
                pred = pre[prev]["total"] * (n / prev) ** 2 * rep(n)
                if pred > a.max_point_s:
                    stop = f"stopped before {lc.fk(n)}: predicted {pred:.0f} s > --max-point-s {a.max_point_s:.0f}"
                    break
            lc.log(f"prefill {n}")
            r = run_worker({**base, "what": "prefill", "length": n, "repeats": rep(n)},
                           timeout=a.max_point_s * max(rep(n), 1) + 120)
            pre[n] = r
            lc.log(f"  -> {_brief(r)}")
            if "error" in r:
                stop = f"failed at {lc.fk(n)}: {r['error']}"
                break
            prev = n

    # ---- 2: port --------------------------------------------------------------------------------------
    if "port" in a.sections:
        port_failed = None
        for n in port_lengths:
            reps = a.port_repeats or (3 if q else lc.repeats_for(n) if n < 16384 else 1)
            spec = {**base, "what": "port", "length": n, "repeats": reps, "skip_port": port_failed is not None}
            lc.log(f"port pair {n}" + (" (seekv4 side only)" if port_failed else ""))
            r = run_worker(spec, timeout=a.max_point_s * reps + 120 if port_failed else a.port_timeout)
            if "error" in r and not spec["skip_port"]:  # worker died in (or around) the port: seekv4 side alone
                lc.log(f"  -> {_brief(r)}; re-measuring the seekv4 side alone")
                err = r["error"]
                r = run_worker({**spec, "skip_port": True}, timeout=a.max_point_s * reps + 120)
                r["port_error"] = err
            elif spec["skip_port"]:
                r["port_error"] = f"skipped (port failed at {lc.fk(port_failed)})"
            port[n] = r
            lc.log(f"  -> {_brief(r)}")
            if "port_error" in r and port_failed is None:
                port_failed = n
            if "error" in r:  # the seekv4 side failed too
                break

    # ---- 3: decode ------------------------------------------------------------------------------------
    if "decode" in a.sections:
        lc.log(f"decode {decode_contexts}")
        dec = run_worker({**base, "what": "decode", "contexts": decode_contexts}, timeout=a.max_point_s + 600)
        lc.log(f"  -> {_brief(dec)}")

    # ---- tables ---------------------------------------------------------------------------------------
    pct = lc.pct
    if pre:
        print(f"## 1. V4 prefill (seekv4, {PRESET})")
        print()
        print("| tokens | prefill (s) | V4 attention (s) | attn share | CSA indexer select (s) | select share "
              "| sparse kernel (s) | kernel share | compressors kv + index (s) | compressor share "
              "| peak RSS incr. (MiB) | time ratio vs prev. length | notes |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        prev = None
        for n, r in pre.items():
            if "error" in r:
                print(f"| {lc.fk(n)} | - | - | - | - | - | - | - | - | - | - | - | {r['error']} |")
                continue
            t = r["total"]
            comp = r.get("compress_kv", 0) + r.get("compress_index", 0)
            ratio = f"{t / pre[prev]['total']:.2f}x ({n // prev}x tokens)" if prev else "-"
            print(f"| {lc.fk(n)} | {_t(t)} | {_s(r, 'attn')} | {pct(r.get('attn', 0), t)} | {_s(r, 'select')} "
                  f"| {pct(r.get('select', 0), t)} | {_s(r, 'kernel')} | {pct(r.get('kernel', 0), t)} "
                  f"| {_t(comp)} ({_s(r, 'compress_kv')} + {_s(r, 'compress_index')}) | {pct(comp, t)} "
                  f"| {max(r['peak_mib'], 0):,.0f} | {ratio} | n={r['n']}, probe {r['probe']:.0f} GFLOP/s |")
            prev = n
        ok = [n for n, r in pre.items() if "error" not in r]
        print()
        print(f"Largest length measured: {lc.fk(max(ok)) if ok else '-'}"
              + (f" ({stop})" if stop else " (all requested lengths ran)"))
        print()
    if port:
        print("## 2. transformers DeepseekV4ForCausalLM port vs seekv4 (converted, same weights)")
        print()
        print("| tokens | port prefill (s) | seekv4 prefill (s) | ratio port/seekv4 (>1: seekv4 faster) "
              "| port peak RSS incr. (MiB) | seekv4 peak RSS incr. (MiB) | notes |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for n, r in port.items():
            if "error" in r:
                print(f"| {lc.fk(n)} | - | - | - | - | - | port: {r.get('port_error', '-')}; seekv4: {r['error']} |")
                continue
            note = f"n={r['n']} {'seekv4 runs' if 'port_error' in r else 'interleaved pairs'}, probe {r['probe']:.0f} GFLOP/s"
            sv = f"{_t(r['seekv4'])} | " if "seekv4" in r else "- | "
            if "port_error" in r:
                print(f"| {lc.fk(n)} | port: {r['port_error']} | {sv}- | - | {max(r['seekv4_peak_mib'], 0):,.0f} | {note} |")
            else:
                print(f"| {lc.fk(n)} | {_t(r['port'])} | {sv}{r['ratio']:.2f}x | {max(r['port_peak_mib'], 0):,.0f} "
                      f"| {max(r['seekv4_peak_mib'], 0):,.0f} | {note} |")
        print()
    if dec:
        print(f"## 3. V4 decode ({DECODE_STEPS} single-token steps per context, interleaved, median)")
        print()
        if "error" in dec:
            print(f"failed: {dec['error']}\n")
        else:
            print("| context | ms/token | V4 attention ms/token | indexer select ms/token | sparse kernel ms/token "
                  "| compressors ms/token | ratio vs smallest context | context prefill (s) |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            c0, c1 = decode_contexts[0], decode_contexts[-1]
            d = dec["contexts"]
            for c in decode_contexts:
                r = d[str(c)]
                print(f"| {lc.fk(c)} | {r['ms']:.2f} | {r['attn_ms']:.2f} | {r['select_ms']:.2f} | {r['kernel_ms']:.2f} "
                      f"| {r['compress_kv_ms'] + r['compress_index_ms']:.2f} | {r['ms'] / d[str(c0)]['ms']:.2f}x "
                      f"| {_t(r['prefill_s'])} |")
            ratio = d[str(c1)]["ms"] / d[str(c0)]["ms"]
            print(f"\ndecode ms/token {lc.fk(c1)} / {lc.fk(c0)}: {ratio:.2f}x (target <= 2x: "
                  f"{'**met**' if ratio <= 2 else '**NOT met**'}); probe {dec['probe']:.0f} GFLOP/s")
            print()

    seen = {r.get("code") for r in [*pre.values(), *port.values(), dec or {}] if r.get("code")}
    seen.add(lc.code_hash(V4_FILES))
    if seen != {code0}:
        print(f"WARNING: the V4 source files changed during the run (hashes {sorted(seen)} vs {code0} at start); "
              f"rows from different code versions are mixed.")
    else:
        print(f"V4 source files unchanged during the run (hash {code0}).")
    print(f"total wall time {time.perf_counter() - t_start:,.0f} s")


if __name__ == "__main__":
    main()
