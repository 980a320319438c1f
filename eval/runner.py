"""`seekv4 eval`: greedy generation over benchmark records, resumable, scored with the `evaluate` metric modules.
code_perplexity records are scored without generation: the per-token NLL of the record's span given its cropped
context (`loglikelihood`, the same tokens lm-eval's `loglikelihood` scores).

Output folder: `samples.partial.jsonl` grows one line per record while running (a rerun skips records already
there); on completion it becomes `samples.jsonl` and `results.json`, `results.md`, `results.png` are written.
A folder without `results.json` is therefore never a finished run. Each sample records its run identity: the
content fingerprint of the model (see fingerprint.py), the dtype, the sha256 of its task's records and of the
sources, and the generation settings. A rerun reuses only samples of the same identity, so any --tasks,
--buckets and --limit select records of one model's run; samples of another model are refused, never mixed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pathlib
import platform
import time

from . import scoring
from .build import BUCKETS, DATA_DIR
from .fingerprint import DigestCache, model_fingerprint, task_fingerprints
from .prompts import (MAX_NEW_TOKENS, EvalError, load_records, load_sources, parse_buckets, parse_tasks,
                      perplexity_pair, render)

NEXTLINE_TASKS = ("repo_nextline", "file_nextline", "api_recall")   # prediction = the next code line
RUN_FILES = ("samples.partial.jsonl", "samples.jsonl", "results.json", "results.md", "results.png")
RUN_PARTS = {"dtype": "--dtype", "task_sha256": "the task's records (tasks.jsonl)",
             "sources_sha256": "the benchmark sources (sources.jsonl)", "generation": "the generation settings"}
MODEL_PARTS = {"kind": "the kind of model", "config": "the model config", "weights": "the model weights",
               "tokenizer": "the tokenizer", "sha256": "the GGUF file", "preset": "the preset", "seed": "the seed"}
FRESH_START = "pass a new --output folder, or --overwrite to discard the samples and results saved there."
logger = logging.getLogger("seekv4.eval")


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


def _differences(saved: dict, now: dict) -> list[str]:
    """What differs between two run identities, in words."""
    out = []
    saved_model, now_model = saved.get("model"), now["model"]
    keys = ["kind"] if saved_model.get("kind") != now_model.get("kind") else [*now_model, *saved_model]
    for key in dict.fromkeys(keys):
        if saved_model.get(key) != now_model.get(key):
            out.append(f"{MODEL_PARTS.get(key, key)} ({_short(saved_model.get(key))} saved, "
                       f"{_short(now_model.get(key))} now)")
    for key in dict.fromkeys([*now, *saved]):
        if key != "model" and saved.get(key) != now.get(key):
            out.append(f"{RUN_PARTS.get(key, key)} ({_short(saved.get(key))} saved, {_short(now.get(key))} now)")
    return out


def _short(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


def _read_samples(path: pathlib.Path, runs: dict) -> list[dict]:
    """Saved samples of `path`; each must come from the same run identity as `runs[task]` now (per task, so
    adding tasks to a run keeps its other samples; samples of tasks not requested now must still come from
    the same model and dtype: one model per folder). A torn last line (an interrupted write) is dropped."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1            # every sample is written as one line ending in a newline
    samples = []
    for n, line in enumerate(data[:complete].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            samples.append(json.loads(line))
        except ValueError as err:
            raise EvalError(f"line {n} of {path} is not valid JSON ({err}): the file is damaged; "
                            f"{FRESH_START}") from err
    now = next(iter(runs.values()))
    for s in samples:
        run = s.get("run", {})
        if not isinstance(run.get("model"), dict):
            raise EvalError(f"{path} holds samples written before runs were fingerprinted by content, identified "
                            f"only by the --model string {run.get('model')!r}: they cannot be shown to come "
                            f"from this model; {FRESH_START}")
        if s["task"] in runs:
            expected = runs[s["task"]]
        else:
            expected = {**run, "model": now["model"], "dtype": now["dtype"]}
        if run != expected:
            raise EvalError(f"{path} holds samples of a different run ({s['task']}): "
                            f"{'; '.join(_differences(run, expected))} differ; {FRESH_START}")
    if complete < len(data):
        logger.warning(f"{path}: dropped a torn last line ({len(data) - complete} bytes, no newline: an "
                       "interrupted write); its record is evaluated again.")
        os.truncate(path, complete)
    return samples


def _discard_run(out: pathlib.Path) -> None:
    """--overwrite: remove the files `seekv4 eval` writes (nothing else in the folder), saying which."""
    removed = [name for name in RUN_FILES if (out / name).is_file()]
    for name in removed:
        (out / name).unlink()
    if removed:
        logger.warning(f"--overwrite: removed {', '.join(removed)} from {out}.")


def run_eval(model: str, tasks, buckets, output: str, limit: int | None = None, dtype: str = "float32",
             progress: bool = True, overwrite: bool = False) -> dict:
    """Evaluate `model` on tasks x buckets; write the output folder (see the module docstring); return results.
    `overwrite`: discard the folder's saved samples and results (once the model has loaded) and start over."""
    from tqdm.auto import tqdm

    from .models import load_model
    from .report import write_reports

    tasks, buckets = parse_tasks(tasks), parse_buckets(buckets)
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}.")
    out = pathlib.Path(output)
    if out.exists() and not out.is_dir():
        raise EvalError(f"--output {out} is a file; pass a folder.")
    # identify the run before loading the model: a mismatch is refused without the cost of a load
    cache = DigestCache(out)
    fingerprint = model_fingerprint(model, cache)
    task_sha256, sources_sha256 = task_fingerprints(DATA_DIR)
    runs = {t: {"model": fingerprint, "dtype": dtype, "task_sha256": task_sha256[t],
                "sources_sha256": sources_sha256,
                "generation": {"do_sample": False, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS[t]}}
            for t in tasks}
    partial, final = out / "samples.partial.jsonl", out / "samples.jsonl"
    saved = [] if overwrite else _read_samples(final if final.exists() else partial, runs)
    lm = load_model(model, dtype)
    too_long = [b for b in buckets if BUCKETS[b] > lm.context_length]
    if too_long:
        raise EvalError(f"bucket(s) {', '.join(too_long)} exceed the context of {model} ({lm.context_length} "
                        f"tokens, max_position_embeddings); use buckets up to {lm.context_length} tokens.")
    records = load_records(tasks, buckets, limit)
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    tasks_sha = manifest["files"]["tasks.jsonl"]
    if overwrite:
        _discard_run(out)
    done = {s["id"]: s for s in saved}
    todo = [r for r in records if r["id"] not in done]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        cache.save()            # before generating: an interrupted run resumes without re-hashing the weights
        if final.exists():
            final.rename(partial)  # more records requested than the finished run had: extend it
        sources = load_sources()
        count = lambda text: len(lm.encode(text))  # noqa: E731
        with open(partial, "a", encoding="utf-8") as f:
            name = os.path.basename(os.path.normpath(model))
            for record in tqdm(todo, desc=f"eval {name}", disable=not progress):
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
               "model_fingerprint": fingerprint, "versions": _versions(), "scores": aggregate(samples),
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
