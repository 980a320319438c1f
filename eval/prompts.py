"""Benchmark records -> prompts, cropped to a token budget with the evaluated model's tokenizer.

Cropping drops whole lines from the front, so the farthest context goes first (records list cross-file
context farthest-first, then the target file's prefix); the prompt's end is never cut. Prompts end at the end
of the line before the target (no trailing newline: BPE merges of "\n" + indentation would otherwise make the
first generated token unnatural).
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable

from .build import BUCKETS, DATA_DIR, TASK_ORDER as TASKS
# Greedy generation length per task (LongBench uses 64 for next-line; needle answers are one short line);
# code_perplexity generates nothing: its budget is context + scored span.
MAX_NEW_TOKENS = {"repo_nextline": 64, "file_nextline": 64, "code_needle": 16, "api_recall": 64, "code_perplexity": 0}
GENERATION_TASKS = ("repo_nextline", "file_nextline", "code_needle", "api_recall")


class EvalError(Exception):
    """A user error in evaluation input (task, bucket, model, output folder); the message names the fix."""


def parse_buckets(names) -> list[str]:
    unknown = [b for b in names if b not in BUCKETS]
    if unknown:
        raise EvalError(f"unknown bucket(s) {', '.join(unknown)}; choose from {', '.join(BUCKETS)}.")
    return sorted(set(names), key=BUCKETS.get)


def parse_tasks(names) -> list[str]:
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise EvalError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}.")
    return [t for t in TASKS if t in names]


def load_sources(data_dir=DATA_DIR) -> dict[str, str]:
    with open(pathlib.Path(data_dir) / "sources.jsonl", encoding="utf-8") as f:
        return {row["path"]: row["text"] for row in map(json.loads, f)}


def load_records(tasks, buckets, limit: int | None = None, data_dir=DATA_DIR) -> list[dict]:
    """Records of the given tasks and bucket names, in file order; at most `limit` per (task, bucket).
    Loaded with `datasets` (the JSONL is a `json` dataset)."""
    import datasets

    ds = datasets.load_dataset("json", data_files=str(pathlib.Path(data_dir) / "tasks.jsonl"), split="train")
    wanted = {BUCKETS[b] for b in buckets}
    taken: dict[tuple, int] = {}
    out = []
    for record in ds:
        key = (record["task"], record["bucket"])
        if record["task"] in tasks and record["bucket"] in wanted and taken.get(key, 0) < (limit or 1 << 60):
            taken[key] = taken.get(key, 0) + 1
            out.append(record)
    for task in tasks:
        missing = [b for b in buckets if (task, BUCKETS[b]) not in taken]
        if missing:
            raise EvalError(f"task {task} has no examples in bucket(s) {', '.join(missing)} (not enough source "
                            f"code that long); drop them from --buckets or --tasks.")
    return out


def prompt_budget(record: dict) -> int:
    """Prompt tokens allowed so that prompt + generation fit in the bucket."""
    return record["bucket"] - MAX_NEW_TOKENS[record["task"]]


def _crop_front(head: str, lines: list[str], tail: Callable[[str], str], count: Callable[[str], int],
                budget: int) -> str:
    """head + tail("\n".join(lines[-m:])) for the largest m that fits the budget. Galloping search from the
    end, so tokenised strings stay within ~2x the budget however long the record's full context is."""
    def fits(m):
        return count(head + tail("\n".join(lines[len(lines) - m:]))) <= budget

    if not fits(1):
        raise EvalError(f"the end of the prompt {tail(lines[-1])[-200:]!r} alone exceeds the prompt budget of "
                        f"{budget} tokens.")
    lo = 1                                       # fits(lo) holds
    hi = 2
    while hi <= len(lines) and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, len(lines) + 1)                 # fits(hi) fails, or hi is past the start
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return head + tail("\n".join(lines[len(lines) - lo:]))


def target_prefix(text: str, lineno: int) -> str:
    """The target file up to the end of the last non-blank line before line `lineno` (1-based)."""
    lines = text.split("\n")[:lineno - 1]
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _file_block(path: str, text: str) -> str:
    return f"# Path: {path}\n{text}\n\n"


def insert_at_depth(haystack: str, needle: str, depth: float) -> str:
    """Insert the needle at the first blank line at or after `depth` of the haystack's lines (a statement
    boundary), or at the very start / end for depth 0 / 1."""
    lines = haystack.split("\n")
    at = round(depth * len(lines))
    while 0 < at < len(lines) and lines[at - 1].strip():
        at += 1
    return "\n".join(lines[:at] + [needle] + lines[at:])


def render(record: dict, sources: dict[str, str], count: Callable[[str], int]) -> str:
    """The prompt of one record, cropped so that count(prompt) <= prompt_budget(record). For code_perplexity
    the prompt is the context of the scored span `record["target"]`, cropped so that
    count(prompt + span) <= the bucket (see `perplexity_pair`)."""
    budget, task = prompt_budget(record), record["task"]
    if task == "code_perplexity":
        span = record["target"]
        prefix = target_prefix(sources[record["target_file"]], record["target_line"])
        if record["context_files"]:
            head = f"# Repo Name: {record['repo']}\n"
            body = ("".join(_file_block(p, sources[p]) for p in record["context_files"])
                    + f"# Path: {record['target_file']}\n" + prefix)
        else:
            head, body = "", prefix
        return _crop_front(head, body.split("\n"), lambda b: b + span, count, budget)[:-len(span)]
    if task == "code_needle":
        haystack = "".join(_file_block(p, sources[p]) for p in record["context_files"]).split("\n")
        query = "\n" + record["query"]
        return _crop_front("", haystack, lambda h: insert_at_depth(h, record["needle"], record["depth"]) + query,
                           count, budget)
    prefix = target_prefix(sources[record["target_file"]], record["target_line"])
    if task == "file_nextline":
        return _crop_front("", prefix.split("\n"), lambda body: body, count, budget)
    # repo_nextline and api_recall
    body = ("".join(_file_block(p, sources[p]) for p in record["context_files"])
            + f"# Path: {record['target_file']}\n" + prefix)
    return _crop_front(f"# Repo Name: {record['repo']}\n", body.split("\n"), lambda b: b, count, budget)


def perplexity_pair(context: str, span: str) -> tuple[str, str]:
    """(context, continuation) as lm-eval's `_encode_pair` splits them: trailing whitespace of the context moves
    to the continuation. The scored tokens are then `encode(context + continuation)[len(encode(context)):]`."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + span
    return context, span
