"""`seekv4 eval`: greedy generation over benchmark records, resumable, scored with the `evaluate` metric modules.

Output folder: `samples.partial.jsonl` grows one line per record while running (a rerun skips records already
there); on completion it becomes `samples.jsonl` and `results.json`, `results.md`, `results.png` are written.
A folder without `results.json` is therefore never a finished run.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import time

from . import scoring
from .build import BUCKETS, DATA_DIR
from .prompts import MAX_NEW_TOKENS, EvalError, load_records, load_sources, parse_buckets, parse_tasks, render

NEXTLINE_TASKS = ("repo_nextline", "file_nextline")


def _stop_when(task: str):
    """A decoded-text predicate: once true, more tokens cannot change the extracted prediction."""
    if task in NEXTLINE_TASKS:
        # the predicted line is complete once it is followed by a newline
        return lambda text: scoring.extract_next_line(text[:text.rfind("\n") + 1]) != ""
    return lambda text: "\n" in text


def generate(lm, prompt: str, task: str) -> tuple[str, int]:
    """Greedy continuation of `prompt` (batch 1) -> (text, prompt tokens)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids = torch.tensor([lm.encode(prompt)])                         # [1, prompt_len]
    done = _stop_when(task)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([done(lm.decode(input_ids[0, ids.shape[1]:].tolist()))])

    config = lm.model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS[task],
                                do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([Stop()]))
    return lm.decode(out[0, ids.shape[1]:].tolist()), ids.shape[1]


def score_sample(task: str, generation: str, answers: list[str]) -> tuple[str, dict]:
    """(prediction, per-sample scores): next-line tasks take the best answer (there is one today)."""
    if task in NEXTLINE_TASKS:
        pred = scoring.extract_next_line(generation)
        return pred, {name: max(fn(pred, a) for a in answers) for name, fn in (
            ("exact_match", scoring.exact_match), ("exact_match_strict", scoring.exact_match_strict),
            ("edit_sim", scoring.edit_similarity))}
    pred = scoring.first_line(generation)
    return pred, {"needle_accuracy": scoring.needle_accuracy(pred, answers)}


def aggregate(samples: list[dict]) -> dict:
    """{task: {bucket: {metric: value, "n", "prompt_tokens", "categories": {category: {metric: value, "n"}}}}},
    computed with the shipped `evaluate` metric modules."""
    import evaluate

    from .metrics import metric_path

    nextline = evaluate.combine([evaluate.load(metric_path("code_exact_match")),
                                 evaluate.load(metric_path("edit_similarity"))])
    needle = evaluate.load(metric_path("needle_accuracy"))

    def compute(group):
        metric = needle if group[0]["task"] == "code_needle" else nextline
        refs = [s["answers"] if metric is needle else s["answers"][0] for s in group]
        return {**metric.compute(predictions=[s["prediction"] for s in group], references=refs), "n": len(group)}

    out: dict = {}
    for task in dict.fromkeys(s["task"] for s in samples):
        out[task] = {}
        for bucket in sorted({s["bucket"] for s in samples if s["task"] == task}):
            group = [s for s in samples if s["task"] == task and s["bucket"] == bucket]
            row = compute(group)
            row["prompt_tokens"] = sum(s["prompt_tokens"] for s in group) / len(group)
            row["categories"] = {c: compute([s for s in group if s["category"] == c])
                                 for c in sorted({s["category"] for s in group})}
            out[task][str(bucket)] = row
    return out


def _read_samples(path: pathlib.Path, run: dict) -> list[dict]:
    if not path.exists():
        return []
    samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for s in samples:
        if s["run"] != run:
            raise EvalError(f"{path} holds samples of a different run ({s['run']}, now {run}); "
                            "pass a new --output folder.")
    return samples


def run_eval(model: str, tasks, buckets, output: str, limit: int | None = None, dtype: str = "float32",
             progress: bool = True) -> dict:
    """Evaluate `model` on tasks x buckets; write the output folder (see the module docstring); return results."""
    from tqdm.auto import tqdm

    from .models import load_model
    from .report import write_reports

    tasks, buckets = parse_tasks(tasks), parse_buckets(buckets)
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}.")
    out = pathlib.Path(output)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output {out} is a file; pass a folder.")
    lm = load_model(model, dtype)
    too_long = [b for b in buckets if BUCKETS[b] > lm.context_length]
    if too_long:
        raise EvalError(f"bucket(s) {', '.join(too_long)} exceed the context of {model} ({lm.context_length} "
                        f"tokens, max_position_embeddings); use buckets up to {lm.context_length} tokens.")
    records = load_records(tasks, buckets, limit)
    tasks_sha = json.loads((DATA_DIR / "manifest.json").read_text())["files"]["tasks.jsonl"]
    run = {"model": model, "dtype": dtype, "tasks_sha256": tasks_sha, "max_new_tokens": MAX_NEW_TOKENS}
    partial, final = out / "samples.partial.jsonl", out / "samples.jsonl"
    done = {s["id"]: s for s in _read_samples(final if final.exists() else partial, run)}
    todo = [r for r in records if r["id"] not in done]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.rename(partial)  # more records requested than the finished run had: extend it
        sources = load_sources()
        count = lambda text: len(lm.encode(text))  # noqa: E731
        with open(partial, "a", encoding="utf-8") as f:
            for record in tqdm(todo, desc=f"eval {os.path.basename(model)}", disable=not progress):
                start = time.perf_counter()
                generation, n_prompt = generate(lm, render(record, sources, count), record["task"])
                prediction, scores = score_sample(record["task"], generation, record["answers"])
                sample = {k: record[k] for k in ("id", "task", "bucket", "category", "answers")}
                sample.update(prompt_tokens=n_prompt, generation=generation, prediction=prediction, scores=scores,
                              seconds=round(time.perf_counter() - start, 3), run=run)
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
                f.flush()
                done[record["id"]] = sample
        partial.rename(final)
    samples = [done[r["id"]] for r in records]
    results = {"model": model, "dtype": dtype, "tasks": tasks, "buckets": buckets, "limit": limit,
               "context_length": lm.context_length, "tasks_sha256": tasks_sha, "max_new_tokens": MAX_NEW_TOKENS,
               "versions": _versions(), "scores": aggregate(samples),
               "samples_sha256": hashlib.sha256(final.read_bytes()).hexdigest()}
    write_reports(results, out)
    return results


def _versions() -> dict:
    import datasets
    import evaluate
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "datasets": datasets.__version__,
            "evaluate": evaluate.__version__}
