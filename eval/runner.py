"""`seekv4 eval`: greedy generation over benchmark records, resumable, scored with the `evaluate` metric modules.
code_perplexity records are scored without generation: the per-token NLL of the record's span given its cropped
context (`loglikelihood`, the same tokens lm-eval's `loglikelihood` scores).

Output folder: `samples.partial.jsonl` grows one line per record while running (a rerun skips records already
there); on completion it becomes `samples.jsonl` and `results.json`, `results.md`, `results.png` are written.
A folder without `results.json` is therefore never a finished run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import platform
import time

from . import scoring
from .build import BUCKETS, DATA_DIR
from .prompts import (MAX_NEW_TOKENS, EvalError, load_records, load_sources, parse_buckets, parse_tasks,
                      perplexity_pair, render)

NEXTLINE_TASKS = ("repo_nextline", "file_nextline", "api_recall")   # prediction = the next code line
# Samples written before builder v2 identify their run by the sha256 of the whole v1 tasks.jsonl; its records
# of these tasks are byte-identical in v2 (per-task sha256 below = manifest "task_sha256"; tested), so such
# samples stay valid and old runs resume.
LEGACY_TASKS_SHA256 = {"406cd7f2190ef728975371a1820f70d2fd0d9d18e64ec6b9c484e7a26d55f5ce": {
    "repo_nextline": "fa27167a49fc36769d98b2c02ada2e9707cd589cb91f586968fb4522b58ee35b",
    "file_nextline": "bad4872e7a40590b89e06a2f0ee4c2c6a91cd5723b3943c2bcb3b6d85be2260d",
    "code_needle": "cfd5717b54e273b49147ce41195ce3f555cd81f2471a8beb49aed01ef92035e7"}}


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


def loglikelihood(lm, context: str, span: str) -> tuple[list[float], int]:
    """(per-token NLLs in nats of the span's tokens, context tokens), tokenised as lm-eval's HFLM does for
    `loglikelihood`: context tokens = encode(context), span tokens = encode(context + span)[len(context tokens):]
    after moving the context's trailing whitespace to the span; one forward pass over all but the last token."""
    import inspect

    import torch

    context, span = perplexity_pair(context, span)
    ctx_ids = lm.encode(context)
    cont_ids = lm.encode(context + span)[len(ctx_ids):]
    if not ctx_ids or not cont_ids:
        raise EvalError(f"cannot score a span of {len(cont_ids)} tokens after {len(ctx_ids)} context tokens; "
                        "the tokenizer must give both a context and a span token.")
    ids = torch.tensor([(ctx_ids + cont_ids)[:-1]])                    # [1, T - 1]
    kwargs = {}
    if "logits_to_keep" in inspect.signature(lm.model.forward).parameters:
        kwargs["logits_to_keep"] = len(cont_ids)                         # only the positions that predict the span
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs).logits
    logprobs = torch.log_softmax(logits[0, -len(cont_ids):].float(), dim=-1)   # [n_span, vocab]
    nll = -logprobs.gather(1, torch.tensor(cont_ids)[:, None])[:, 0]
    return nll.tolist(), len(ctx_ids)


def score_sample(task: str, generation: str, answers: list[str], query: str = "") -> tuple[str, dict]:
    """(prediction, per-sample scores): next-line tasks take the best answer (there is one today); api_recall
    adds the call scores for callee `query`."""
    if task in NEXTLINE_TASKS:
        pred = scoring.extract_next_line(generation)
        scores = {name: max(fn(pred, a) for a in answers) for name, fn in (
            ("exact_match", scoring.exact_match), ("exact_match_strict", scoring.exact_match_strict),
            ("edit_sim", scoring.edit_similarity))}
        if task == "api_recall":
            scores.update(api_match=max(scoring.api_match(pred, a, query) for a in answers),
                          api_name_match=scoring.api_name_match(pred, query))
        return pred, scores
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
    api = evaluate.load(metric_path("api_recall"))
    perplexity = evaluate.load(metric_path("bucket_perplexity"))

    def compute(group):
        task, preds = group[0]["task"], [s["prediction"] for s in group]
        if task == "code_perplexity":
            # one bucket per group: the metric's overall nll / perplexity are this bucket's (token-weighted)
            out = perplexity.compute(predictions=[s["token_nlls"] for s in group],
                                     references=[str(s["bucket"]) for s in group])
            nats, n_bytes = sum(sum(s["token_nlls"]) for s in group), sum(s["span_bytes"] for s in group)
            return {"nll": out["nll"], "perplexity": out["perplexity"], "bits_per_byte": nats / n_bytes / math.log(2),
                    "span_tokens": sum(len(s["token_nlls"]) for s in group) / len(group), "n": len(group)}
        if task == "code_needle":
            return {**needle.compute(predictions=preds, references=[s["answers"] for s in group]), "n": len(group)}
        out = nextline.compute(predictions=preds, references=[s["answers"][0] for s in group])
        if task == "api_recall":
            out.update(api.compute(predictions=preds, references=[s["answers"][0] for s in group],
                                   callees=[s["query"] for s in group]))
        return {**out, "n": len(group)}

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


def _run_of(sample: dict) -> dict:
    """A sample's run identity; pre-v2 samples (whole-file tasks sha256, all tasks' max_new_tokens) mapped to
    the per-task form."""
    run = sample["run"]
    legacy = LEGACY_TASKS_SHA256.get(run.get("tasks_sha256"), {})
    if sample["task"] in legacy and isinstance(run.get("max_new_tokens"), dict):
        return {"model": run["model"], "dtype": run["dtype"], "task_sha256": legacy[sample["task"]],
                "max_new_tokens": run["max_new_tokens"][sample["task"]]}
    return run


def _read_samples(path: pathlib.Path, runs: dict) -> list[dict]:
    """Saved samples of `path`; each must come from the same model, dtype, task data and generation length
    as `runs[task]` now (the run identity is per task, so adding tasks to a run keeps its other samples)."""
    if not path.exists():
        return []
    samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    now = next(iter(runs.values()))
    for s in samples:
        run = _run_of(s)
        # samples of tasks not requested now must still come from the same model and dtype (one model per folder)
        expected = runs.get(s["task"], {**run, "model": now["model"], "dtype": now["dtype"]})
        if run != expected:
            raise EvalError(f"{path} holds samples of a different run ({run}, now {expected}); "
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
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    tasks_sha = manifest["files"]["tasks.jsonl"]
    runs = {t: {"model": model, "dtype": dtype, "task_sha256": manifest["task_sha256"][t],
                "max_new_tokens": MAX_NEW_TOKENS[t]} for t in tasks}
    partial, final = out / "samples.partial.jsonl", out / "samples.jsonl"
    saved = _read_samples(final if final.exists() else partial, runs)
    done = {s["id"]: s for s in saved}
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
                prompt = render(record, sources, count)
                sample = {k: record[k] for k in ("id", "task", "bucket", "category", "answers")}
                if record["task"] == "code_perplexity":
                    nlls, n_prompt = loglikelihood(lm, prompt, record["target"])
                    sample.update(prompt_tokens=n_prompt, token_nlls=nlls, prediction="",
                                  span_bytes=len(record["target"].encode("utf-8")),
                                  scores={"nll": sum(nlls) / len(nlls)})
                else:
                    generation, n_prompt = generate(lm, prompt, record["task"])
                    prediction, scores = score_sample(record["task"], generation, record["answers"], record["query"])
                    sample.update(prompt_tokens=n_prompt, generation=generation, prediction=prediction, scores=scores)
                    if record["task"] == "api_recall":
                        sample.update(query=record["query"], definition_in_prompt=record["needle"] in prompt)
                sample.update(seconds=round(time.perf_counter() - start, 3), run=runs[record["task"]])
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
