"""Long-context benchmark of DeepSeek Sparse Attention (DSA, V3.2) in seekv4 (CPU, float32, batch 1).

Model: preset `tiny-deepseek-v3.2` (MLA + DSA on every layer + MoE, 4 layers, index_topk 16) at --shape h256 (default:
the issue's hidden-256 shape with V3.2's head proportions, see SHAPES) or tiny (hidden 64), with
max_position_embeddings=131072, random weights (seed 0), config.indexer_implementation = --indexer (default fused:
the compiled CPU selection kernel; eager: float32 torch ops). Sections (one run prints them all):

  1. dsa:    prefill of the DSA model at --lengths: total time, indexer selection time
             (`LightningIndexer.select`), main sparse-attention kernel time (`sparse_attention` as called from
             `attention_mla`) and the whole `MLAAttention._sparse` (kernel + absorbed projections), their
             shares, and the peak-RSS increase. Stops at the first length that fails (MemoryError /
             RuntimeError / killed) or whose time, extrapolated quadratically, exceeds --max-point-s.
  2. dense:  the same weights with attention_sparsity=["dense"]*4 (the indexer parameters are dropped) at the
             --lengths <= --dense-max: total time, main attention time (`MLAAttention._expanded` +
             `_absorbed`) and peak RSS; ratio = dense / DSA total time (> 1: DSA faster).
  2b. pair:  dense and DSA models (same weights) timed as --pair-repeats interleaved pairs in one process at
             --pair-length (default 32k); ratio = median over pairs of dense / DSA. The machine's speed drifts by
             up to 2x between minutes, so this, not section 2's separate points, is the number the target uses.
  3. port:   transformers `DeepseekV32ForCausalLM` (random, seed 0) vs `seekv4.convert.from_transformers` of it
             (same weights, same config as the preset) at --port-lengths, timed as interleaved pairs in one
             process; ratio = port / seekv4 (> 1: seekv4 faster).
  4. decode: ms/token of the DSA model at --decode-contexts: prefill each context once, then 16 single-token
             steps per context with the returned cache, the contexts' steps interleaved; median per step.

Every point runs in a fresh subprocess (`--worker`), so peak RSS is per point: Linux VmHWM after resetting it
(write "5" to /proc/self/clear_refs) right before the measured prefill, minus VmRSS at that moment. Before
measuring, each worker does one 256-token warm-up prefill. Timers are time.perf_counter around monkeypatched
functions (CPU ops are synchronous). Each point is bracketed by a 512^3 fp32 matmul probe (GFLOP/s) to show
the CPU phase on shared machines: compare absolute times only between rows with similar probes.

    python bench/long_context.py                  # full run (~15 min on an idle 2-core VM; 128k needs ~16 GiB RAM)
    python bench/long_context.py --quick          # smoke run (tiny lengths, ~1 min)
    python bench/long_context.py --sections dsa --lengths 131072 --max-point-s 7200
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch

PRESET = "tiny-deepseek-v3.2"
MAX_POS = 131072
VOCAB = 256
DECODE_STEPS = 16
WARMUP_TOKENS = 256
PORT_CONFIG = dict(  # the transformers twin of the preset
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=MAX_POS, index_topk=16, index_head_dim=16,
    index_n_heads=4, routed_scaling_factor=2.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
# --shape: `tiny` is the preset as is (hidden 64; its 4 index heads x 16 cost about as much per query-key pair
# as its 4 attention heads, which no released model does). `h256` is the hidden-256 4-layer shape with
# V3.2's proportions: index heads = attention heads / 2 (64 vs 128), index dim = 2/3 of the q·k dim
# (128 vs 192), index RoPE dims = the attention's RoPE dims; top-k stays 16.
SHAPES = {
    "tiny": {},
    "h256": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                 v_head_dim=64, index_n_heads=2, index_head_dim=64),
}
SHAPE = "tiny"  # set by --shape (driver) / the worker spec
INDEXER = "fused"  # config.indexer_implementation of the DSA model; set by --indexer (driver) / the worker spec


def seekv4_overrides() -> dict:
    o = dict(SHAPES[SHAPE])
    if o:
        o.pop("num_key_value_heads")
        o["index_rope_head_dim"] = o["qk_rope_head_dim"]
    return o


def port_config() -> dict:
    return {**PORT_CONFIG, **SHAPES[SHAPE]}


DSA_FILES = ("modeling/indexer.py", "modeling/indexer_kernel.py", "modeling/indexer_topk.c",
             "modeling/sparse_attention.py", "modeling/attention_mla.py", "modeling/dsa.py")


def code_hash(files=DSA_FILES) -> str:
    """Short hash of the measured source files (others edit the repo concurrently: a change mid-run is flagged)."""
    import hashlib

    import seekv4

    root = os.path.dirname(seekv4.__file__)
    h = hashlib.sha256()
    for f in files:
        with open(os.path.join(root, f), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


# ---- worker side -----------------------------------------------------------------------------------

TIMES: dict[str, float] = defaultdict(float)


def _timed(fn, key):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - t0

    wrapper.__wrapped__ = fn
    return wrapper


def install_timers():
    import seekv4.modeling.attention_mla as attention_mla
    import seekv4.modeling.indexer as indexer

    indexer.LightningIndexer.select = _timed(indexer.LightningIndexer.select, "select")
    attention_mla.sparse_attention = _timed(attention_mla.sparse_attention, "kernel")
    attention_mla.MLAAttention._sparse = _timed(attention_mla.MLAAttention._sparse, "sparse")
    attention_mla.MLAAttention._expanded = _timed(attention_mla.MLAAttention._expanded, "dense_attn")
    attention_mla.MLAAttention._absorbed = _timed(attention_mla.MLAAttention._absorbed, "dense_attn")


def build_seekv4(kind: str):
    """kind 'dsa' or 'dense'; both from the same seed-0 DSA model (dense drops the indexer weights)."""
    import seekv4

    torch.manual_seed(0)
    over = seekv4_overrides()
    dsa = seekv4.SeekV4ForCausalLM(seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS,
                                                                  indexer_implementation=INDEXER, **over)).eval()
    if kind == "dsa":
        return dsa
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS, attention_sparsity=["dense"] * 4,
                                          **over)
    dense = seekv4.SeekV4ForCausalLM(cfg).eval()
    res = dense.load_state_dict(dsa.state_dict(), strict=False)
    assert not res.missing_keys and all(".indexer." in k for k in res.unexpected_keys), res
    return dense


def build_port():
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from seekv4.convert import from_transformers

    torch.manual_seed(0)
    src = DeepseekV32ForCausalLM(DeepseekV32Config(**port_config())).float().eval()
    with torch.no_grad():  # non-zero balancing biases, as in a trained checkpoint
        for layer in src.model.layers[PORT_CONFIG["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ours = from_transformers(src).eval()
    ours.config.indexer_implementation = INDEXER
    return src, ours


def ids_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def prefill(model, ids):
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status_kib("VmRSS")


_A, _B = torch.randn(512, 512), torch.randn(512, 512)


def probe_gflops(n: int = 5) -> float:
    def one():
        t0 = time.perf_counter()
        _A @ _B
        return time.perf_counter() - t0

    return 2 * 512**3 / statistics.median(one() for _ in range(n)) / 1e9


def repeats_for(length: int) -> int:
    return 3 if length <= 8192 else 2 if length <= 32768 else 1  # 32k: the targets' length, median of 2


def worker_prefill(kind: str, length: int, repeats: int) -> dict:
    """One DSA or dense point."""
    install_timers()
    return measure_prefill(build_seekv4(kind), length, repeats)


def measure_prefill(model, length: int, repeats: int) -> dict:
    """Peak RSS of the first measured prefill and median times (total + every TIMES key) over `repeats`."""
    ids = ids_of(length)
    runs = []
    p0 = probe_gflops()
    with torch.inference_mode():
        prefill(model, ids_of(WARMUP_TOKENS))
        peak_mib = None
        for i in range(repeats):
            TIMES.clear()
            base = reset_peak()
            t0 = time.perf_counter()
            out = prefill(model, ids)
            total = time.perf_counter() - t0
            if i == 0:
                peak_mib = (_status_kib("VmHWM") - base) / 1024
            del out
            runs.append({"total": total, **TIMES})
    p1 = probe_gflops()
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in {k for r in runs for k in r}}
    return {"n": repeats, "peak_mib": peak_mib, "probe": (p0 + p1) / 2, "runs": runs, **med}


def interleaved(models: dict, length: int, repeats: int) -> tuple[dict, dict, float]:
    """Prefill times of two models as `repeats` interleaved pairs in one process (first model first in pair 0,
    then alternating), so both see the same machine phases -> (times per name, peak RSS MiB of each one's first
    run, mean probe GFLOP/s)."""
    ids = ids_of(length)
    times, peaks = {n: [] for n in models}, {}
    p0 = probe_gflops()
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            prefill(m, ids_of(WARMUP_TOKENS))
        for i in range(repeats):
            for name in (names if i % 2 == 0 else names[::-1]):
                base = reset_peak()
                t0 = time.perf_counter()
                out = prefill(models[name], ids)
                times[name].append(time.perf_counter() - t0)
                peaks.setdefault(name, (_status_kib("VmHWM") - base) / 1024)
                del out
    return times, peaks, (p0 + probe_gflops()) / 2


def worker_port(length: int, repeats: int) -> dict:
    """port vs seekv4 as interleaved pairs; ratio = median over pairs of port / seekv4."""
    src, ours = build_port()
    times, peaks, probe = interleaved({"port": src, "seekv4": ours}, length, repeats)
    ratios = [a / b for a, b in zip(times["port"], times["seekv4"])]
    return {"n": repeats, "port": statistics.median(times["port"]), "seekv4": statistics.median(times["seekv4"]),
            "ratio": statistics.median(ratios), "port_peak_mib": peaks["port"], "probe": probe, "times": times}


def worker_pair(length: int, repeats: int) -> dict:
    """dense vs DSA (same weights) as interleaved pairs; ratio = median over pairs of dense / DSA."""
    times, peaks, probe = interleaved({"dense": build_seekv4("dense"), "dsa": build_seekv4("dsa")}, length, repeats)
    ratios = [a / b for a, b in zip(times["dense"], times["dsa"])]
    return {"n": repeats, "dense": statistics.median(times["dense"]), "dsa": statistics.median(times["dsa"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "probe": probe, "times": times}


def worker_decode(contexts: list[int]) -> dict:
    install_timers()
    model = build_seekv4("dsa")
    ids = ids_of(max(contexts) + DECODE_STEPS)
    steps = ids[:, max(contexts):]
    res = {}
    p0 = probe_gflops()
    with torch.inference_mode():
        prefill(model, ids_of(WARMUP_TOKENS))
        caches, prefill_s = {}, {}
        for c in contexts:
            t0 = time.perf_counter()
            caches[c] = prefill(model, ids[:, :c]).past_key_values
            prefill_s[c] = time.perf_counter() - t0
        for c in contexts:  # warm-up step on a copy
            model(input_ids=steps[:, :1], past_key_values=copy.deepcopy(caches[c]), use_cache=True)
        per = {c: [] for c in contexts}
        sel = {c: [] for c in contexts}
        for i in range(DECODE_STEPS):
            for c in (contexts if i % 2 == 0 else contexts[::-1]):
                TIMES.clear()
                t0 = time.perf_counter()
                out = model(input_ids=steps[:, i : i + 1], past_key_values=caches[c], use_cache=True)
                per[c].append(time.perf_counter() - t0)
                sel[c].append(TIMES["select"])
                caches[c] = out.past_key_values
    p1 = probe_gflops()
    for c in contexts:
        res[str(c)] = {"ms": statistics.median(per[c]) * 1e3, "select_ms": statistics.median(sel[c]) * 1e3,
                       "prefill_s": prefill_s[c]}
    return {"contexts": res, "probe": (p0 + p1) / 2}


CODE_AT_IMPORT = None


def worker_main(spec: dict) -> None:
    global CODE_AT_IMPORT, SHAPE, INDEXER
    import seekv4.modeling  # noqa: F401  (import first, then hash what was imported)

    SHAPE, INDEXER = spec["shape"], spec["indexer"]
    CODE_AT_IMPORT = code_hash()
    torch.set_num_threads(spec["threads"])
    try:
        if spec["what"] == "prefill":
            out = worker_prefill(spec["kind"], spec["length"], spec["repeats"])
        elif spec["what"] == "port":
            out = worker_port(spec["length"], spec["repeats"])
        elif spec["what"] == "pair":
            out = worker_pair(spec["length"], spec["repeats"])
        else:
            out = worker_decode(spec["contexts"])
    except (MemoryError, RuntimeError) as e:
        out = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    out["code"] = CODE_AT_IMPORT
    print("RESULT " + json.dumps(out), flush=True)


# ---- driver side -----------------------------------------------------------------------------------

WORKER_ENV: dict[str, str] = {}  # extra environment of the workers (--thp)


def run_worker(spec: dict, timeout: float, script: str = __file__) -> dict:
    """Run `script --worker SPEC` in a fresh process; its last RESULT line, or an error entry."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env={**os.environ, **WORKER_ENV})
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


def fk(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def growth(d: dict, key: str, a: int, b: int):
    if a in d and b in d and "error" not in d[a] and "error" not in d[b] and d[a].get(key):
        return d[b][key] / d[a][key]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run at tiny lengths")
    p.add_argument("--lengths", type=int, nargs="+", help="DSA prefill lengths (default 4k..128k)")
    p.add_argument("--dense-max", type=int, help="largest dense-baseline length (default 32768)")
    p.add_argument("--port-lengths", type=int, nargs="+", help="port comparison lengths (default 4k 8k 16k)")
    p.add_argument("--decode-contexts", type=int, nargs="+", help="decode contexts (default 2048 32768)")
    p.add_argument("--sections", nargs="+", default=["dsa", "dense", "pair", "port", "decode"],
                   choices=["dsa", "dense", "pair", "port", "decode"])
    p.add_argument("--pair-length", type=int, help="dense vs DSA interleaved pairs at this length (default 32768)")
    p.add_argument("--pair-repeats", type=int, default=3, help="interleaved dense/DSA pairs (default 3)")
    p.add_argument("--max-point-s", type=float, default=3600.0,
                   help="per DSA point: skip lengths whose quadratic extrapolation exceeds this; also the timeout")
    p.add_argument("--dense-max-point-s", type=float, default=600.0, help="dense: skip beyond a point slower than this")
    p.add_argument("--port-repeats", type=int, help="interleaved pairs per port point (default: 3 up to 8k, 1 from 16k)")
    p.add_argument("--port-timeout", type=float, default=1200.0, help="timeout per port point (s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--shape", choices=sorted(SHAPES), default="h256", help="model shape (see SHAPES)")
    p.add_argument("--indexer", choices=["fused", "eager"], default="fused",
                   help="config.indexer_implementation of the seekv4 DSA model (dense and port rows are unaffected)")
    p.add_argument("--thp", action="store_true",
                   help="run every worker with THP_MEM_ALLOC_ENABLE=1 (PyTorch's switch for 2 MiB pages in large CPU "
                        "tensors: far fewer page faults on fresh multi-MB temporaries); default: PyTorch's default")
    a = p.parse_args(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))

    q = a.quick
    lengths = a.lengths or ([256, 512, 1024] if q else [4096, 8192, 16384, 32768, 65536, 131072])
    dense_max = a.dense_max or (1024 if q else 32768)
    port_lengths = a.port_lengths or ([256, 512] if q else [4096, 8192, 16384])
    decode_contexts = a.decode_contexts or ([128, 1024] if q else [2048, 32768])
    rep = (lambda n: 1) if q else repeats_for
    torch.set_num_threads(a.threads)
    if a.thp:
        WORKER_ENV["THP_MEM_ALLOC_ENABLE"] = "1"
    import transformers

    t_start = time.perf_counter()
    print(f"# seekv4 DSA long-context benchmark ({datetime.datetime.now():%Y-%m-%d %H:%M})")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, torch.get_num_threads()={a.threads}, os.cpu_count()={os.cpu_count()}, "
          f"loadavg at start {os.getloadavg()[0]:.1f}")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    code0 = code_hash()
    print(f"repo HEAD {git or '?'}; DSA source hash {code0} ({', '.join(DSA_FILES)})")
    global SHAPE, INDEXER
    SHAPE, INDEXER = a.shape, a.indexer
    print(f"model: preset {PRESET} with shape {a.shape} {seekv4_overrides()} (max_position_embeddings={MAX_POS}), "
          f"indexer_implementation={a.indexer}, float32, batch 1, inference_mode, "
          f"{'THP_MEM_ALLOC_ENABLE=1, ' if a.thp else ''}"
          f"use_cache=True, logits_to_keep=1; command: python bench/long_context.py {' '.join(sys.argv[1:])}")
    print()

    dsa, dense, port, dec = {}, {}, {}, None
    # ---- 1 + 2: DSA and dense points, alternating per length -----------------------------------------
    if "dsa" in a.sections or "dense" in a.sections:
        dsa_stop = dense_stop = None
        prev_dsa = prev_dense = None
        for n in lengths:
            if "dsa" in a.sections and dsa_stop is None:
                if prev_dsa is not None:
                    pred = dsa[prev_dsa]["total"] * (n / prev_dsa) ** 2 * rep(n)
                    if pred > a.max_point_s:
                        dsa_stop = f"stopped before {fk(n)}: predicted {pred:.0f} s > --max-point-s {a.max_point_s:.0f}"
                if dsa_stop is None:
                    log(f"dsa prefill {n}")
                    r = run_worker({"what": "prefill", "kind": "dsa", "length": n, "repeats": rep(n),
                                    "threads": a.threads, "shape": a.shape,
                                    "indexer": a.indexer}, timeout=a.max_point_s * max(rep(n), 1) + 120)
                    dsa[n] = r
                    log(f"  -> {json.dumps({k: v for k, v in r.items() if k != 'runs'})}")
                    if "error" in r:
                        dsa_stop = f"failed at {fk(n)}: {r['error']}"
                    else:
                        prev_dsa = n
            if "dense" in a.sections and dense_stop is None and n <= dense_max:
                if prev_dense is not None and dense[prev_dense]["total"] > a.dense_max_point_s:
                    dense_stop = f"skipped from {fk(n)}: previous point > {a.dense_max_point_s:.0f} s"
                else:
                    log(f"dense prefill {n}")
                    r = run_worker({"what": "prefill", "kind": "dense", "length": n, "repeats": rep(n),
                                    "threads": a.threads, "shape": a.shape,
                                    "indexer": a.indexer}, timeout=a.dense_max_point_s * max(rep(n), 1) * 2 + 120)
                    dense[n] = r
                    log(f"  -> {json.dumps({k: v for k, v in r.items() if k != 'runs'})}")
                    if "error" in r:
                        dense_stop = f"failed at {fk(n)}: {r['error']}"
                    else:
                        prev_dense = n

    # ---- 2b: dense vs DSA as interleaved pairs in one process (the ratio target) -----------------------------
    pair = None
    pair_length = a.pair_length or (1024 if q else 32768)
    if "pair" in a.sections:
        log(f"dense/DSA pairs {pair_length}")
        pair = run_worker({"what": "pair", "length": pair_length, "repeats": a.pair_repeats, "threads": a.threads,
                           "shape": a.shape, "indexer": a.indexer}, timeout=a.dense_max_point_s * 2 * a.pair_repeats + 300)
        log(f"  -> {json.dumps(pair)}")

    # ---- 3: port --------------------------------------------------------------------------------------
    if "port" in a.sections:
        for n in port_lengths:
            log(f"port pair {n}")
            reps = a.port_repeats or (3 if q else rep(n) if n < 16384 else 1)
            port[n] = run_worker({"what": "port", "length": n, "repeats": reps,
                                  "threads": a.threads, "shape": a.shape,
                                    "indexer": a.indexer}, timeout=a.port_timeout)
            log(f"  -> {json.dumps(port[n])}")
            if "error" in port[n]:
                break

    # ---- 4: decode ------------------------------------------------------------------------------------
    if "decode" in a.sections:
        log(f"decode {decode_contexts}")
        dec = run_worker({"what": "decode", "contexts": decode_contexts, "threads": a.threads, "shape": a.shape,
                                    "indexer": a.indexer},
                         timeout=a.max_point_s + 600)
        log(f"  -> {json.dumps(dec)}")

    # ---- tables ---------------------------------------------------------------------------------------
    if dsa:
        print("## 1. DSA prefill (seekv4, index_topk=16)")
        print()
        print("| tokens | prefill (s) | indexer select (s) | select share | sparse kernel (s) | kernel share "
              "| `_sparse` total (s) | peak RSS incr. (MiB) | time ratio vs prev. length | notes |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        prev = None
        for n, r in dsa.items():
            if "error" in r:
                print(f"| {fk(n)} | - | - | - | - | - | - | - | - | {r['error']} |")
                continue
            ratio = f"{r['total'] / dsa[prev]['total']:.2f}x ({n // prev}x tokens)" if prev else "-"
            print(f"| {fk(n)} | {r['total']:,.2f} | {r.get('select', 0):,.2f} | {pct(r.get('select', 0), r['total'])} "
                  f"| {r.get('kernel', 0):,.3f} | {pct(r.get('kernel', 0), r['total'])} | {r.get('sparse', 0):,.3f} "
                  f"| {r['peak_mib']:,.0f} | {ratio} | n={r['n']}, probe {r['probe']:.0f} GFLOP/s |")
            prev = n
        ok = [n for n, r in dsa.items() if "error" not in r]
        print()
        print(f"Largest length measured: {fk(max(ok)) if ok else '-'}" + (f" ({dsa_stop})" if dsa_stop else
                                                                        " (all requested lengths ran)"))
        print()
    if dense:
        print("## 2. Dense-attention baseline (same weights, attention_sparsity dense)")
        print()
        print("| tokens | dense prefill (s) | dense main attn (s) | attn share | dense peak RSS incr. (MiB) "
              "| DSA prefill (s) | DSA sparse kernel (s) | ratio dense/DSA prefill (>1: DSA faster) | notes |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for n, r in dense.items():
            if "error" in r:
                print(f"| {fk(n)} | - | - | - | - | - | - | - | {r['error']} |")
                continue
            d = dsa.get(n, {})
            has = d and "error" not in d
            nan = float("nan")
            dsa_note = f" (DSA point: {d['probe']:.0f})" if has else ""
            print(f"| {fk(n)} | {r['total']:,.2f} | {r.get('dense_attn', 0):,.2f} | {pct(r.get('dense_attn', 0), r['total'])} "
                  f"| {r['peak_mib']:,.0f} | {d['total'] if has else nan:,.2f} | {d.get('kernel', 0) if has else nan:,.3f} "
                  f"| {r['total'] / d['total'] if has else nan:.2f}x | n={r['n']}, probe {r['probe']:.0f} GFLOP/s{dsa_note} |")
        if dense_stop:
            print(f"\nDense: {dense_stop}")
        print()
    if pair:
        print(f"## 2b. Dense vs DSA at {fk(pair_length)}, {a.pair_repeats} interleaved pairs in one process")
        print()
        if "error" in pair:
            print(f"failed: {pair['error']}\n")
        else:
            print("| pair | dense prefill (s) | DSA prefill (s) | dense / DSA |")
            print("|---:|---:|---:|---:|")
            for i, (dn, ds) in enumerate(zip(pair["times"]["dense"], pair["times"]["dsa"])):
                print(f"| {i + 1} | {dn:,.2f} | {ds:,.2f} | {dn / ds:.2f}x |")
            print(f"| median | {pair['dense']:,.2f} | {pair['dsa']:,.2f} | **{pair['ratio']:.2f}x** |")
            print(f"\nprobe {pair['probe']:.0f} GFLOP/s")
            print()
    if port:
        print("## 3. transformers DeepseekV32ForCausalLM port vs seekv4 (converted, same weights)")
        print()
        print("| tokens | port prefill (s) | seekv4 prefill (s) | ratio port/seekv4 (>1: seekv4 faster) "
              "| port peak RSS incr. (MiB) | notes |")
        print("|---:|---:|---:|---:|---:|---|")
        for n, r in port.items():
            if "error" in r:
                print(f"| {fk(n)} | - | - | - | - | {r['error']} |")
                continue
            print(f"| {fk(n)} | {r['port']:,.2f} | {r['seekv4']:,.2f} | {r['ratio']:.2f}x | {r['port_peak_mib']:,.0f} "
                  f"| n={r['n']} interleaved pairs, probe {r['probe']:.0f} GFLOP/s |")
        print()
    if dec:
        print(f"## 4. DSA decode ({DECODE_STEPS} single-token steps per context, interleaved, median)")
        print()
        if "error" in dec:
            print(f"failed: {dec['error']}\n")
        else:
            print("| context | ms/token | indexer select ms/token | ratio vs smallest context | context prefill (s) |")
            print("|---:|---:|---:|---:|---:|")
            c0 = decode_contexts[0]
            for c in decode_contexts:
                r = dec["contexts"][str(c)]
                print(f"| {fk(c)} | {r['ms']:.2f} | {r['select_ms']:.2f} | "
                      f"{r['ms'] / dec['contexts'][str(c0)]['ms']:.2f}x | {r['prefill_s']:,.1f} |")
            print(f"\nprobe {dec['probe']:.0f} GFLOP/s")
            print()

    # ---- targets --------------------------------------------------------------------------------------
    rows = []

    def target(name, value, op, thr, ref=""):
        if value is None:
            rows.append(f"| {name} | n/a | {op} {thr} | not measured | {ref} |")
        else:
            met = value <= thr if op == "<=" else value >= thr
            rows.append(f"| {name} | {value:.2f}x | {op} {thr}x | {'**met**' if met else '**NOT met**'} | {ref} |")

    lo, hi = (512, 1024) if q else (8192, 32768)
    target(f"DSA main attention (sparse kernel) time growth {fk(lo)}->{fk(hi)}", growth(dsa, "kernel", lo, hi), "<=", 4.5,
           f"`_sparse` total: {growth(dsa, 'sparse', lo, hi) or float('nan'):.2f}x; dense main attn: "
           f"{growth(dense, 'dense_attn', lo, hi) or float('nan'):.2f}x")
    target(f"DSA whole-prefill peak RSS growth {fk(lo)}->{fk(hi)}", growth(dsa, "peak_mib", lo, hi), "<=", 5,
           f"dense: {growth(dense, 'peak_mib', lo, hi) or float('nan'):.2f}x")
    sp, how = None, ""
    if pair and "error" not in pair:
        sp, how = pair["ratio"], f"median of {pair['n']} interleaved pairs at {fk(pair_length)} (section 2b)"
    elif hi in dsa and hi in dense and "error" not in dsa[hi] and "error" not in dense[hi]:
        sp, how = dense[hi]["total"] / dsa[hi]["total"], "separate points (section 2)"
    target(f"prefill {fk(pair_length if pair and 'error' not in pair else hi)}: dense time / DSA time", sp, ">=", 5, how)
    pn = port_lengths[-1]
    target(f"prefill {fk(pn)}: port time / seekv4 time", port.get(pn, {}).get("ratio"), ">=", 8)
    dr = None
    if dec and "error" not in dec:
        dr = dec["contexts"][str(decode_contexts[-1])]["ms"] / dec["contexts"][str(decode_contexts[0])]["ms"]
    target(f"decode ms/token {fk(decode_contexts[-1])} / {fk(decode_contexts[0])}", dr, "<=", 2)
    print("## Targets")
    print()
    print("| target | measured | threshold | status | reference |")
    print("|---|---:|---:|---|---|")
    print("\n".join(rows))
    print()
    seen = {r.get("code") for r in [*dsa.values(), *dense.values(), *port.values(), dec or {}, pair or {}] if r.get("code")}
    seen.add(code_hash())
    if seen != {code0}:
        print(f"WARNING: the DSA source files changed during the run (hashes {sorted(seen)} vs {code0} at start); "
              f"rows from different code versions are mixed.")
    else:
        print(f"DSA source files unchanged during the run (hash {code0}).")
    print(f"total wall time {time.perf_counter() - t_start:,.0f} s")


if __name__ == "__main__":
    main()
