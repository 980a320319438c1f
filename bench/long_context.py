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

Every point runs in a fresh subprocess (`--worker`); peak RSS, the 512^3 fp32 matmul probe (GFLOP/s) that brackets
each point, and the timers around library functions are bench/common.py's. Before measuring, each worker does one
256-token warm-up prefill. The output starts with the CPU model and ISA the figures were measured on.

    python bench/long_context.py                  # full run (~15 min on an idle 2-core VM; 128k needs ~16 GiB RAM)
    python bench/long_context.py --quick          # smoke run (tiny lengths, ~1 min)
    python bench/long_context.py --sections dsa --lengths 131072 --max-point-s 7200
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402

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
# as its 4 attention heads, which no released model does). `h256` is a hidden-256 4-layer shape with V3.2's
# proportions: index heads = attention heads / 2 (64 vs 128), index dim = 2/3 of the q·k dim (128 vs 192),
# index RoPE dims = the attention's RoPE dims; top-k stays 16.
SHAPES = {
    "tiny": {},
    "h256": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                 v_head_dim=64, index_n_heads=2, index_head_dim=64),
}
DSA_FILES = ("modeling/indexer.py", "modeling/indexer_kernel.py", "modeling/indexer_topk.c",
             "modeling/sparse_attention.py", "modeling/attention_mla.py", "modeling/sparsity.py")
TIMERS = common.Timers()


@dataclass(frozen=True)
class ModelSpec:
    """What every worker builds its models from (passed in the worker spec, never through globals)."""

    shape: str = "h256"
    indexer: str = "fused"  # config.indexer_implementation of the DSA model

    def seekv4_overrides(self) -> dict:
        o = dict(SHAPES[self.shape])
        if o:
            o.pop("num_key_value_heads")
            o["index_rope_head_dim"] = o["qk_rope_head_dim"]
        return o

    def port_config(self) -> dict:
        return {**PORT_CONFIG, **SHAPES[self.shape]}


# ---- worker side -----------------------------------------------------------------------------------

def install_timers():
    import seekv4.modeling.attention_mla as attention_mla
    import seekv4.modeling.indexer as indexer

    wrap = TIMERS.wrap
    indexer.LightningIndexer.select = wrap(indexer.LightningIndexer.select, "select")
    attention_mla.sparse_attention = wrap(attention_mla.sparse_attention, "kernel")
    attention_mla.MLAAttention._sparse = wrap(attention_mla.MLAAttention._sparse, "sparse")
    attention_mla.MLAAttention._expanded = wrap(attention_mla.MLAAttention._expanded, "dense_attn")
    attention_mla.MLAAttention._absorbed = wrap(attention_mla.MLAAttention._absorbed, "dense_attn")


def build_seekv4(kind: str, spec: ModelSpec):
    """kind 'dsa' or 'dense'; both from the same seed-0 DSA model (dense drops the indexer weights)."""
    import seekv4

    torch.manual_seed(0)
    over = spec.seekv4_overrides()
    dsa = seekv4.SeekV4ForCausalLM(seekv4.SeekV4Config.from_preset(
        PRESET, max_position_embeddings=MAX_POS, indexer_implementation=spec.indexer, **over)).eval()
    if kind == "dsa":
        return dsa
    cfg = seekv4.SeekV4Config.from_preset(PRESET, max_position_embeddings=MAX_POS, attention_sparsity=["dense"] * 4,
                                          **over)
    dense = seekv4.SeekV4ForCausalLM(cfg).eval()
    res = dense.load_state_dict(dsa.state_dict(), strict=False)
    assert not res.missing_keys and all(".indexer." in k for k in res.unexpected_keys), res
    return dense


def build_port(spec: ModelSpec):
    from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

    from seekv4.convert import from_transformers

    torch.manual_seed(0)
    src = DeepseekV32ForCausalLM(DeepseekV32Config(**spec.port_config())).float().eval()
    with torch.no_grad():  # non-zero balancing biases, as in a trained checkpoint
        for layer in src.model.layers[PORT_CONFIG["first_k_dense_replace"]:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ours = from_transformers(src).eval()
    ours.config.indexer_implementation = spec.indexer
    return src, ours


def ids_of(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def prefill(model, ids):
    return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def repeats_for(length: int) -> int:
    return 3 if length <= 8192 else 2 if length <= 32768 else 1  # 32k: the targets' length, median of 2


def measure_prefill(model, length: int, repeats: int, timers: common.Timers = TIMERS) -> dict:
    """Peak RSS of the first measured prefill and median times (total + every timer key) over `repeats`."""
    ids = ids_of(length)
    runs, peak_mib = [], None
    p0 = common.matmul_gflops()
    with torch.inference_mode():
        prefill(model, ids_of(WARMUP_TOKENS))
        for i in range(repeats):
            timers.clear()
            base = common.reset_peak()
            t0 = time.perf_counter()
            out = prefill(model, ids)
            total = time.perf_counter() - t0
            if i == 0:
                peak_mib = common.peak_mib_since(base)
            del out
            runs.append({"total": total, **timers.snapshot()})
    probe = (p0 + common.matmul_gflops()) / 2
    return {"n": repeats, "peak_mib": peak_mib, "probe": probe, "runs": runs, **common.median_of(runs)}


def interleaved(models: dict, length: int, repeats: int) -> tuple[dict, dict, float]:
    """Prefill times of two models as `repeats` interleaved pairs in one process (first model first in pair 0,
    then alternating), so both see the same machine phases -> (times per name, peak RSS MiB of each one's first
    run, mean probe GFLOP/s)."""
    ids = ids_of(length)
    times, peaks = {n: [] for n in models}, {}
    p0 = common.matmul_gflops()
    names = list(models)
    with torch.inference_mode():
        for m in models.values():
            prefill(m, ids_of(WARMUP_TOKENS))
        for i in range(repeats):
            for name in (names if i % 2 == 0 else names[::-1]):
                base = common.reset_peak()
                t0 = time.perf_counter()
                out = prefill(models[name], ids)
                times[name].append(time.perf_counter() - t0)
                peaks.setdefault(name, common.peak_mib_since(base))
                del out
    return times, peaks, (p0 + common.matmul_gflops()) / 2


def worker_prefill(spec: ModelSpec, kind: str, length: int, repeats: int) -> dict:
    """One DSA or dense point."""
    install_timers()
    return measure_prefill(build_seekv4(kind, spec), length, repeats)


def worker_port(spec: ModelSpec, length: int, repeats: int) -> dict:
    """port vs seekv4 as interleaved pairs; ratio = median over pairs of port / seekv4."""
    src, ours = build_port(spec)
    times, peaks, probe = interleaved({"port": src, "seekv4": ours}, length, repeats)
    ratios = [a / b for a, b in zip(times["port"], times["seekv4"])]
    return {"n": repeats, "port": statistics.median(times["port"]), "seekv4": statistics.median(times["seekv4"]),
            "ratio": statistics.median(ratios), "port_peak_mib": peaks["port"], "probe": probe, "times": times}


def worker_pair(spec: ModelSpec, length: int, repeats: int) -> dict:
    """dense vs DSA (same weights) as interleaved pairs; ratio = median over pairs of dense / DSA."""
    models = {"dense": build_seekv4("dense", spec), "dsa": build_seekv4("dsa", spec)}
    times, peaks, probe = interleaved(models, length, repeats)
    ratios = [a / b for a, b in zip(times["dense"], times["dsa"])]
    return {"n": repeats, "dense": statistics.median(times["dense"]), "dsa": statistics.median(times["dsa"]),
            "ratio": statistics.median(ratios), "ratios": ratios, "probe": probe, "times": times}


def decode_steps(model, contexts: list[int], timers: common.Timers) -> tuple[dict, dict]:
    """Prefill each context once, then DECODE_STEPS single-token steps per context, the contexts' steps
    interleaved -> (per context: list of {total, timer keys} per step, per context: prefill seconds)."""
    ids = ids_of(max(contexts) + DECODE_STEPS)
    steps = ids[:, max(contexts):]
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
        for i in range(DECODE_STEPS):
            for c in (contexts if i % 2 == 0 else contexts[::-1]):
                timers.clear()
                t0 = time.perf_counter()
                out = model(input_ids=steps[:, i: i + 1], past_key_values=caches[c], use_cache=True)
                per[c].append({"total": time.perf_counter() - t0, **timers.snapshot()})
                caches[c] = out.past_key_values
    return per, prefill_s


def worker_decode(spec: ModelSpec, contexts: list[int]) -> dict:
    install_timers()
    model = build_seekv4("dsa", spec)
    p0 = common.matmul_gflops()
    per, prefill_s = decode_steps(model, contexts, TIMERS)
    res = {}
    for c in contexts:
        med = common.median_of(per[c])
        res[str(c)] = {"ms": med["total"] * 1e3, "select_ms": med.get("select", 0.0) * 1e3, "prefill_s": prefill_s[c]}
    return {"contexts": res, "probe": (p0 + common.matmul_gflops()) / 2}


def worker_main(job: dict) -> None:
    import seekv4.modeling  # noqa: F401  (import first, then hash what was imported)

    code = common.code_hash(DSA_FILES)
    torch.set_num_threads(job["threads"])
    spec = ModelSpec(**job["model"])
    try:
        if job["what"] == "prefill":
            out = worker_prefill(spec, job["kind"], job["length"], job["repeats"])
        elif job["what"] == "port":
            out = worker_port(spec, job["length"], job["repeats"])
        elif job["what"] == "pair":
            out = worker_pair(spec, job["length"], job["repeats"])
        else:
            out = worker_decode(spec, job["contexts"])
    except (MemoryError, RuntimeError) as e:
        out = {"error": common.short_error(e)}
    out["code"] = code
    common.emit_result(out)


# ---- driver side -----------------------------------------------------------------------------------

@dataclass
class Plan:
    """The driver's options after defaults (--quick picks tiny lengths)."""

    model: ModelSpec
    threads: int
    sections: list[str]
    lengths: list[int]
    dense_max: int
    port_lengths: list[int]
    decode_contexts: list[int]
    pair_length: int
    pair_repeats: int
    port_repeats: int | None
    max_point_s: float
    dense_max_point_s: float
    port_timeout: float
    quick: bool
    env: dict

    def repeats(self, n: int) -> int:
        return 1 if self.quick else repeats_for(n)

    def job(self, what: str, **fields) -> dict:
        return {"what": what, "threads": self.threads, "model": asdict(self.model), **fields}


def run(plan: Plan, job: dict, timeout: float) -> dict:
    common.log(f"{job['what']} {job.get('kind', '')} {job.get('length', job.get('contexts', ''))}")
    r = common.run_worker(__file__, job, timeout, plan.env)
    common.log(f"  -> {common.brief(r)}")
    return r


def run_prefill_points(plan: Plan) -> tuple[dict, dict, str | None, str | None]:
    """Sections 1 + 2: DSA and dense points, alternating per length; each stops at its first failure, DSA also
    before a length whose quadratic extrapolation exceeds --max-point-s, dense after a point slower than
    --dense-max-point-s."""
    dsa, dense, dsa_stop, dense_stop = {}, {}, None, None
    for n in plan.lengths:
        if "dsa" in plan.sections and dsa_stop is None:
            ok = [m for m in dsa if "error" not in dsa[m]]
            pred = dsa[ok[-1]]["total"] * (n / ok[-1]) ** 2 * plan.repeats(n) if ok else 0.0
            if pred > plan.max_point_s:
                dsa_stop = (f"stopped before {common.fk(n)}: predicted {pred:.0f} s > --max-point-s "
                            f"{plan.max_point_s:.0f}")
            else:
                dsa[n] = run(plan, plan.job("prefill", kind="dsa", length=n, repeats=plan.repeats(n)),
                             plan.max_point_s * plan.repeats(n) + 120)
                dsa_stop = f"failed at {common.fk(n)}: {dsa[n]['error']}" if "error" in dsa[n] else None
        if "dense" in plan.sections and dense_stop is None and n <= plan.dense_max:
            last = dense[list(dense)[-1]] if dense else None
            if last is not None and last["total"] > plan.dense_max_point_s:
                dense_stop = f"skipped from {common.fk(n)}: previous point > {plan.dense_max_point_s:.0f} s"
                continue
            dense[n] = run(plan, plan.job("prefill", kind="dense", length=n, repeats=plan.repeats(n)),
                           plan.dense_max_point_s * plan.repeats(n) * 2 + 120)
            dense_stop = f"failed at {common.fk(n)}: {dense[n]['error']}" if "error" in dense[n] else None
    return dsa, dense, dsa_stop, dense_stop


def run_port_points(plan: Plan) -> dict:
    port = {}
    for n in plan.port_lengths:
        reps = plan.port_repeats or (3 if plan.quick else plan.repeats(n) if n < 16384 else 1)
        port[n] = run(plan, plan.job("port", length=n, repeats=reps), plan.port_timeout)
        if "error" in port[n]:
            break
    return port


def dsa_table(dsa: dict, stop: str | None) -> str:
    rows, prev = [], None
    for n, r in dsa.items():
        if "error" in r:
            rows.append([common.fk(n)] + ["-"] * 8 + [r["error"]])
            continue
        ratio = f"{r['total'] / dsa[prev]['total']:.2f}x ({n // prev}x tokens)" if prev else "-"
        sel, ker = r.get("select", 0), r.get("kernel", 0)
        rows.append([common.fk(n), common.num(r["total"]), common.num(sel), common.pct(sel, r["total"]),
                     common.num(ker, 3), common.pct(ker, r["total"]), common.num(r.get("sparse", 0), 3),
                     common.num(r["peak_mib"], 0), ratio, f"n={r['n']}, probe {r['probe']:.0f} GFLOP/s"])
        prev = n
    ok = [n for n, r in dsa.items() if "error" not in r]
    largest = f"Largest length measured: {common.fk(max(ok)) if ok else '-'} ({stop or 'all requested lengths ran'})"
    headers = ["tokens", "prefill (s)", "indexer select (s)", "select share", "sparse kernel (s)", "kernel share",
               "`_sparse` total (s)", "peak RSS incr. (MiB)", "time ratio vs prev. length", "notes"]
    return common.table(headers, rows) + "\n\n" + largest


def dense_table(dense: dict, dsa: dict, stop: str | None) -> str:
    rows = []
    for n, r in dense.items():
        if "error" in r:
            rows.append([common.fk(n)] + ["-"] * 7 + [r["error"]])
            continue
        d = dsa.get(n) if dsa.get(n) and "error" not in dsa[n] else None
        attn = r.get("dense_attn", 0)
        note = f"n={r['n']}, probe {r['probe']:.0f} GFLOP/s" + (f" (DSA point: {d['probe']:.0f})" if d else "")
        rows.append([common.fk(n), common.num(r["total"]), common.num(attn), common.pct(attn, r["total"]),
                     common.num(r["peak_mib"], 0), common.num(d and d["total"]), common.num(d and d.get("kernel"), 3),
                     f"{r['total'] / d['total']:.2f}x" if d else "-", note])
    headers = ["tokens", "dense prefill (s)", "dense main attn (s)", "attn share", "dense peak RSS incr. (MiB)",
               "DSA prefill (s)", "DSA sparse kernel (s)", "ratio dense/DSA prefill (>1: DSA faster)", "notes"]
    return common.table(headers, rows) + (f"\n\nDense: {stop}" if stop else "")


def pair_table(pair: dict) -> str:
    if "error" in pair:
        return f"failed: {pair['error']}"
    rows = [[i + 1, common.num(dn), common.num(ds), f"{dn / ds:.2f}x"]
            for i, (dn, ds) in enumerate(zip(pair["times"]["dense"], pair["times"]["dsa"]))]
    rows.append(["median", common.num(pair["dense"]), common.num(pair["dsa"]), f"**{pair['ratio']:.2f}x**"])
    return common.table(["pair", "dense prefill (s)", "DSA prefill (s)", "dense / DSA"], rows) + \
        f"\n\nprobe {pair['probe']:.0f} GFLOP/s"


def port_table(port: dict) -> str:
    rows = []
    for n, r in port.items():
        if "error" in r:
            rows.append([common.fk(n), "-", "-", "-", "-", r["error"]])
            continue
        rows.append([common.fk(n), common.num(r["port"]), common.num(r["seekv4"]), f"{r['ratio']:.2f}x",
                     common.num(r["port_peak_mib"], 0),
                     f"n={r['n']} interleaved pairs, probe {r['probe']:.0f} GFLOP/s"])
    headers = ["tokens", "port prefill (s)", "seekv4 prefill (s)", "ratio port/seekv4 (>1: seekv4 faster)",
               "port peak RSS incr. (MiB)", "notes"]
    return common.table(headers, rows)


def decode_table(dec: dict, contexts: list[int]) -> str:
    if "error" in dec:
        return f"failed: {dec['error']}"
    base = dec["contexts"][str(contexts[0])]["ms"]
    rows = [[common.fk(c), f"{r['ms']:.2f}", f"{r['select_ms']:.2f}", f"{r['ms'] / base:.2f}x",
             common.num(r["prefill_s"], 1)] for c in contexts for r in [dec["contexts"][str(c)]]]
    headers = ["context", "ms/token", "indexer select ms/token", "ratio vs smallest context", "context prefill (s)"]
    return common.table(headers, rows) + f"\n\nprobe {dec['probe']:.0f} GFLOP/s"


def growth(d: dict, key: str, a: int, b: int):
    if a in d and b in d and "error" not in d[a] and "error" not in d[b] and d[a].get(key):
        return d[b][key] / d[a][key]
    return None


def targets_table(plan: Plan, dsa: dict, dense: dict, pair: dict | None, port: dict, dec: dict | None) -> str:
    lo, hi = (512, 1024) if plan.quick else (8192, 32768)
    fk, nan = common.fk, float("nan")
    rows = [
        common.target_row(f"DSA main attention (sparse kernel) time growth {fk(lo)}->{fk(hi)}",
                          growth(dsa, "kernel", lo, hi), "<=", 4.5,
                          f"`_sparse` total: {growth(dsa, 'sparse', lo, hi) or nan:.2f}x; dense main attn: "
                          f"{growth(dense, 'dense_attn', lo, hi) or nan:.2f}x"),
        common.target_row(f"DSA whole-prefill peak RSS growth {fk(lo)}->{fk(hi)}", growth(dsa, "peak_mib", lo, hi),
                          "<=", 5, f"dense: {growth(dense, 'peak_mib', lo, hi) or nan:.2f}x"),
    ]
    if pair and "error" not in pair:
        rows.append(common.target_row(f"prefill {fk(plan.pair_length)}: dense time / DSA time", pair["ratio"], ">=", 5,
                                      f"median of {pair['n']} interleaved pairs (section 2b)"))
    else:
        both = all(hi in d and "error" not in d[hi] for d in (dsa, dense))
        sep = dense[hi]["total"] / dsa[hi]["total"] if both else None
        rows.append(common.target_row(f"prefill {fk(hi)}: dense time / DSA time", sep, ">=", 5,
                                      "separate points (section 2)"))
    pn = plan.port_lengths[-1]
    rows.append(common.target_row(f"prefill {fk(pn)}: port time / seekv4 time", port.get(pn, {}).get("ratio"),
                                  ">=", 8))
    dr = None
    if dec and "error" not in dec:
        ms = {c: dec["contexts"][str(c)]["ms"] for c in (plan.decode_contexts[0], plan.decode_contexts[-1])}
        dr = ms[plan.decode_contexts[-1]] / ms[plan.decode_contexts[0]]
    rows.append(common.target_row(f"decode ms/token {fk(plan.decode_contexts[-1])} / {fk(plan.decode_contexts[0])}",
                                  dr, "<=", 2))
    return common.table(common.TARGET_HEADERS, rows)


def parse_plan(argv) -> tuple[argparse.Namespace, Plan]:
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
    p.add_argument("--port-repeats", type=int,
                   help="interleaved pairs per port point (default: 3 up to 8k, 1 from 16k)")
    p.add_argument("--port-timeout", type=float, default=1200.0, help="timeout per port point (s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--shape", choices=sorted(SHAPES), default="h256", help="model shape (see SHAPES)")
    p.add_argument("--indexer", choices=["fused", "eager"], default="fused",
                   help="config.indexer_implementation of the seekv4 DSA model (dense and port rows are unaffected)")
    p.add_argument("--thp", action="store_true",
                   help="run every worker with THP_MEM_ALLOC_ENABLE=1 (PyTorch's switch for 2 MiB pages in large CPU "
                        "tensors: far fewer page faults on fresh multi-MB temporaries); default: PyTorch's default")
    a = p.parse_args(argv)
    q = a.quick
    plan = Plan(
        model=ModelSpec(a.shape, a.indexer), threads=a.threads, sections=a.sections,
        lengths=a.lengths or ([256, 512, 1024] if q else [4096, 8192, 16384, 32768, 65536, 131072]),
        dense_max=a.dense_max or (1024 if q else 32768),
        port_lengths=a.port_lengths or ([256, 512] if q else [4096, 8192, 16384]),
        decode_contexts=a.decode_contexts or ([128, 1024] if q else [2048, 32768]),
        pair_length=a.pair_length or (1024 if q else 32768), pair_repeats=a.pair_repeats, port_repeats=a.port_repeats,
        max_point_s=a.max_point_s, dense_max_point_s=a.dense_max_point_s, port_timeout=a.port_timeout, quick=q,
        env={"THP_MEM_ALLOC_ENABLE": "1"} if a.thp else {},
    )
    return a, plan


def main(argv=None):
    a, plan = parse_plan(argv)
    if a.worker:
        return worker_main(json.loads(a.worker))
    torch.set_num_threads(plan.threads)
    t_start = time.perf_counter()
    print(common.header("seekv4 DSA long-context benchmark", __file__, plan.threads, sys.argv[1:] if argv is None
                        else argv))
    code0 = common.code_hash(DSA_FILES)
    print(f"DSA source hash {code0} ({', '.join(DSA_FILES)})")
    print(f"model: preset {PRESET} with shape {plan.model.shape} {plan.model.seekv4_overrides()} "
          f"(max_position_embeddings={MAX_POS}), indexer_implementation={plan.model.indexer}, float32, batch 1, "
          f"inference_mode, {'THP_MEM_ALLOC_ENABLE=1, ' if plan.env else ''}use_cache=True, logits_to_keep=1\n")

    dsa, dense, dsa_stop, dense_stop = run_prefill_points(plan)
    pair = run(plan, plan.job("pair", length=plan.pair_length, repeats=plan.pair_repeats),
               plan.dense_max_point_s * 2 * plan.pair_repeats + 300) if "pair" in plan.sections else None
    port = run_port_points(plan) if "port" in plan.sections else {}
    dec = run(plan, plan.job("decode", contexts=plan.decode_contexts), plan.max_point_s + 600) \
        if "decode" in plan.sections else None

    if dsa:
        common.section("1. DSA prefill (seekv4, index_topk=16)", dsa_table(dsa, dsa_stop))
    if dense:
        common.section("2. Dense-attention baseline (same weights, attention_sparsity dense)",
                       dense_table(dense, dsa, dense_stop))
    if pair:
        common.section(f"2b. Dense vs DSA at {common.fk(plan.pair_length)}, {plan.pair_repeats} interleaved pairs in "
                       "one process", pair_table(pair))
    if port:
        common.section("3. transformers DeepseekV32ForCausalLM port vs seekv4 (converted, same weights)",
                       port_table(port))
    if dec:
        common.section(f"4. DSA decode ({DECODE_STEPS} single-token steps per context, interleaved, median)",
                       decode_table(dec, plan.decode_contexts))
    common.section("Targets", targets_table(plan, dsa, dense, pair, port, dec))
    seen = {r.get("code") for r in [*dsa.values(), *dense.values(), *port.values(), dec or {}, pair or {}]
            if r.get("code")} | {common.code_hash(DSA_FILES)}
    print(f"WARNING: the DSA source files changed during the run (hashes {sorted(seen)} vs {code0} at start); rows "
          "from different code versions are mixed." if seen != {code0} else
          f"DSA source files unchanged during the run (hash {code0}).")
    print(f"total wall time {time.perf_counter() - t_start:,.0f} s")


if __name__ == "__main__":
    main()
