"""Evaluation reports: results.json, a Markdown table and a PNG of score (and perplexity) vs context length."""
from __future__ import annotations

import json
import os
import pathlib

from .build import BUCKETS

METRICS = {"repo_nextline": ("edit_sim", "exact_match", "exact_match_strict"),
           "file_nextline": ("edit_sim", "exact_match", "exact_match_strict"),
           "code_needle": ("needle_accuracy",),
           "api_recall": ("api_match", "api_name_match", "edit_sim", "exact_match", "exact_match_strict"),
           "code_perplexity": ("perplexity", "bits_per_byte", "nll")}
NOT_PERCENT = {"perplexity", "bits_per_byte", "nll"}   # code_perplexity: lower is better, not a percentage
_BUCKET_NAMES = {v: k for k, v in BUCKETS.items()}


def markdown(results: dict) -> str:
    """One row per (task, metric[, category]), one column per bucket; scores in percent except code_perplexity's
    (perplexity per token, bits per byte of the span, NLL in nats per token)."""
    buckets = results["buckets"]
    lines = [f"Model: `{results['model']}` ({results['dtype']}, context {results['context_length']}); "
             f"greedy; limit {results['limit']} per task and bucket.", "",
             "| task | metric | " + " | ".join(buckets) + " |", "|---|---|" + "---:|" * len(buckets)]
    for task, per_bucket in results["scores"].items():
        rows = [(metric, None) for metric in METRICS[task]]
        categories = sorted({c for row in per_bucket.values() for c in row["categories"]})
        if len(categories) > 1:
            rows += [(f"{metric} [{c}]", c) for c in categories for metric in METRICS[task][:2]]
        for label, category in rows:
            cells = []
            for b in buckets:
                row = per_bucket.get(str(BUCKETS[b]))
                row = row and (row["categories"].get(category) if category else row)
                metric = label.split(" ")[0]
                cells.append(f"{row[metric]:.{3 if metric in NOT_PERCENT else 1}f} (n={row['n']})" if row else "–")
            lines.append(f"| {task} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Mean prompt tokens: " + "; ".join(
        f"{task} " + ", ".join(f"{_BUCKET_NAMES[int(b)]} {row['prompt_tokens']:.0f}" for b, row in pb.items())
        for task, pb in results["scores"].items()))
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = results["scores"]
    panels = [("score (%)", [t for t in scores if t != "code_perplexity"]),
              ("perplexity (per token)", [t for t in scores if t == "code_perplexity"])]
    panels = [(label, tasks) for label, tasks in panels if tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (label, tasks) in zip(axes[0], panels):
        for task in tasks:
            per_bucket = scores[task]
            xs = sorted(int(b) for b in per_bucket)
            for metric in METRICS[task][:1 if task == "code_perplexity" else 2]:
                ax.plot(xs, [per_bucket[str(x)][metric] for x in xs], marker="o", label=f"{task} {metric}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([BUCKETS[b] for b in results["buckets"]], results["buckets"])
        ax.set_xlabel("context bucket (tokens)")
        ax.set_ylabel(label)
        if label.startswith("score"):
            ax.set_ylim(-2, 102)
        ax.set_title(os.path.basename(results["model"].rstrip("/")))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_atomic(path: pathlib.Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_reports(results: dict, out: pathlib.Path) -> None:
    """results.md and results.png first; results.json (the completion marker) last."""
    write_atomic(out / "results.md", lambda p: p.write_text(markdown(results), encoding="utf-8"))
    write_atomic(out / "results.png", lambda p: plot(results, p))
    write_atomic(out / "results.json", lambda p: p.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8"))
