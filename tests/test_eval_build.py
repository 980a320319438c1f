"""Benchmark builder (line categories, determinism, shipped hashes) and prompt assembly / cropping."""
import ast
import hashlib
import json
import platform

import pytest

from seekv4.eval import build, prompts

PKG_A = "def helper(x, y):\n    return x + y\n"
PKG_B = """from .a import helper

LIMIT = 10

def f(value):
    total = helper(value, LIMIT)
    again = helper(value, 2)
    return max(total, LIMIT)
"""


def test_line_categories_on_a_hand_written_repo():
    lines, imported = build.classify_lines(PKG_B, "pkg/b.py", {"pkg/a.py", "pkg/b.py"})
    assert lines == [(6, "cross_file_first"), (7, "cross_file"), (8, "in_file")]
    assert imported == ["pkg/a.py"]


PKG_C = """from . import a
from .a import helper as h, Point

def g(v):
    h(v)
    p = Point(v, 2)
    w = a.helper(v, y=3) + a.helper(1, 2)
    return h(v, 1)
"""
PKG_POINT = PKG_A + "\nclass Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"


def test_api_calls_on_a_hand_written_repo():
    """Candidates: the file's first call of a cross-file top-level function/class with >= 2 arguments."""
    trees = {"pkg/a.py": ast.parse(PKG_POINT), "pkg/c.py": ast.parse(PKG_C)}
    calls = build.api_calls(PKG_C, "pkg/c.py", set(trees), trees)
    # line 5: h(v) has 1 argument; line 8: h's first call was line 5; line 7: the second a.helper call is
    # not the first of the file; `h` resolves to `helper` (import alias), `a.helper` through the module import
    assert calls == [(6, "Point", "pkg/a.py", 4), (7, "a.helper", "pkg/a.py", 1)]
    assert build.first_call_in_line("    w = a.helper(v, y=3) + a.helper(1, 2)") == ("a.helper", 2)
    assert build.first_call_in_line("x = f(g(1), *a, **k)", "g") == ("g", 1)
    assert build.first_call_in_line("x = f(g(1), *a, **k)") == ("f", 3)
    assert build.first_call_in_line("return f(a,") is None


def test_perplexity_span_is_the_shortest_line_aligned_tail(monkeypatch):
    monkeypatch.setattr(build, "PPL_CHARS", 10)
    text = "a = 1\nbb = 22\nccc = 333\n"
    # the prompt of line 3 ends after "bb = 22" (13 chars): 11 chars remain >= 10; line 4 would leave 1
    assert build.perplexity_span_start(text) == 3
    assert text[len(prompts.target_prefix(text, 3)):] == "\nccc = 333\n"
    with pytest.raises(ValueError, match="too short"):
        build.perplexity_span_start("a = 1\n")


def test_prefix_ends_at_the_last_non_blank_line():
    text = "a = 1\n\n\nb = 2\n"
    assert build.prefix_lengths(text)[4] == len("a = 1")       # target line 4: blank lines 2-3 dropped
    assert prompts.target_prefix(text, 4) == "a = 1"
    assert build.prefix_lengths(text)[2] == len("a = 1")
    assert prompts.target_prefix(text, 1) == ""


def test_insert_at_depth_uses_statement_boundaries():
    hay = "x = 1\ny = 2\n\nz = 3\nw = 4"
    assert prompts.insert_at_depth(hay, "N", 0.0) == "N\n" + hay
    assert prompts.insert_at_depth(hay, "N", 1.0) == hay + "\nN"
    # depth 0.2 -> line 1 ("y = 2") is mid-block; the next boundary is after the blank line
    assert prompts.insert_at_depth(hay, "N", 0.2) == "x = 1\ny = 2\n\nN\nz = 3\nw = 4"


def _records():
    return [json.loads(line) for line in (build.DATA_DIR / "tasks.jsonl").read_text().splitlines()]


def test_shipped_files_match_manifest():
    manifest = json.loads((build.DATA_DIR / "manifest.json").read_text())
    for name, sha in manifest["files"].items():
        assert hashlib.sha256((build.DATA_DIR / name).read_bytes()).hexdigest() == sha, name
    sources = {}
    for line in (build.DATA_DIR / "sources.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        sources[row["path"]] = row["text"]
        assert hashlib.sha256(row["text"].encode()).hexdigest() == row["sha256"] == manifest["sources"][row["path"]]
    records = _records()
    assert {r["task"] for r in records} == set(prompts.TASKS)
    lines = (build.DATA_DIR / "tasks.jsonl").read_bytes().splitlines(keepends=True)
    for task in prompts.TASKS:   # per-task sha256 (the run identity of `seekv4 eval` samples)
        mine = b"".join(line for line, r in zip(lines, records) if r["task"] == task)
        assert hashlib.sha256(mine).hexdigest() == manifest["task_sha256"][task], task
    for r in records:
        text = sources.get(r["target_file"], "")
        if r["task"] in ("repo_nextline", "file_nextline", "api_recall"):   # targets are real source lines
            assert text.split("\n")[r["target_line"] - 1] == r["target"] == r["answers"][0]
        if r["task"] == "api_recall":   # the target calls a function/class defined in the last context file
            callee, n_args = build.first_call_in_line(r["target"], r["query"])
            assert callee == r["query"] and n_args >= build.API_MIN_ARGS
            definition = r["needle"].split()[1].split("(")[0].rstrip(":")
            assert callee.rsplit(".", 1)[-1] == definition or f" as {callee}" in text
            assert r["needle"] in sources[r["context_files"][-1]]
            assert r["category"] == r["needle"].split()[0].replace("def", "function").replace("async", "function")
        if r["task"] == "code_perplexity":   # a fixed span: the file's tail after the prompt of target_line
            assert prompts.target_prefix(text, r["target_line"]) + r["target"] == text
            assert build.PPL_CHARS <= len(r["target"]) and r["target"].startswith("\n") and r["answers"] == []
    counts = manifest["counts"]
    assert counts["repo_nextline"]["2048"] >= 60 and counts["code_needle"]["131072"] == 10
    assert counts["api_recall"]["2048"] >= 10 and counts["code_perplexity"]["2048"] == 30
    assert {r["category"] for r in records if r["task"] == "repo_nextline"} == set(build.REPO_CATEGORIES)
    assert {r["category"] for r in records if r["task"] == "code_perplexity"} == {"repo", "file"}
    # code_perplexity's order ignores the bucket: `--limit N` scores the same spans at every bucket they fill
    spans = {b: [r["id"].split("/", 2)[2] for r in records if r["task"] == "code_perplexity" and r["bucket"] == b]
             for b in (2048, 32768)}
    assert spans[2048][:5] == spans[32768][:5]


V1_TASK_SHA256 = {  # builder v1's records of these tasks; published scores were computed on exactly these
    "repo_nextline": "fa27167a49fc36769d98b2c02ada2e9707cd589cb91f586968fb4522b58ee35b",
    "file_nextline": "bad4872e7a40590b89e06a2f0ee4c2c6a91cd5723b3943c2bcb3b6d85be2260d",
    "code_needle": "cfd5717b54e273b49147ce41195ce3f555cd81f2471a8beb49aed01ef92035e7",
}


def test_v1_records_are_unchanged():
    """Builder v2 only appended tasks: the v1 tasks' records are byte-identical, so v1 scores stay comparable."""
    manifest = json.loads((build.DATA_DIR / "manifest.json").read_text())
    for task, sha in V1_TASK_SHA256.items():
        assert manifest["task_sha256"][task] == sha, task


@pytest.mark.skipif(platform.python_version() != json.loads((build.DATA_DIR / "manifest.json").read_text())
                    ["python_version"], reason="the shipped benchmarks come from another CPython's stdlib")
def test_rebuild_is_byte_identical(tmp_path, capsys):
    """`seekv4 build-benchmarks --out DIR --check` rebuilds from the stdlib and compares with the manifest."""
    from seekv4.cli import main

    assert main(["build-benchmarks", "--out", str(tmp_path), "--check"]) == 0
    assert "OK: rebuilt files are byte-identical" in capsys.readouterr().out
    for name in build.OUTPUT_FILES + ("manifest.json",):
        assert (tmp_path / name).read_bytes() == (build.DATA_DIR / name).read_bytes(), name


def _first(task, bucket):
    return next(r for r in _records() if r["task"] == task and r["bucket"] == bucket)


@pytest.mark.parametrize("task", prompts.TASKS)
def test_prompts_are_cropped_to_the_budget_and_maximal(task):
    """With a 1-char-per-token counter: prompt <= budget, and one more context line would not fit."""
    sources = prompts.load_sources()
    record = _first(task, 2048)
    budget = prompts.prompt_budget(record)
    prompt = prompts.render(record, sources, len)
    if task == "code_perplexity":   # the budget covers context + scored span
        assert budget - 400 < len(prompt + record["target"]) <= budget == record["bucket"]
        text = sources[record["target_file"]]
        assert (prompt + record["target"]).endswith(text[-1500:]) and not prompt.endswith("\n")
        bigger = dict(record, bucket=record["bucket"] + 300)
        assert len(prompts.render(bigger, sources, len)) > len(prompt)
        return
    assert budget - 400 < len(prompt) <= budget
    if task == "code_needle":
        assert record["needle"] in prompt and prompt.endswith("\n" + record["query"])
    else:
        prefix = prompts.target_prefix(sources[record["target_file"]], record["target_line"])
        # ends at the end of the previous non-blank line, never with a newline
        assert prompt.endswith(prefix[-200:]) and not prompt.endswith("\n")
        if task in ("repo_nextline", "api_recall"):
            assert prompt.startswith(f"# Repo Name: {record['repo']}\n")
    bigger = dict(record, bucket=record["bucket"] + 300)
    assert len(prompts.render(bigger, sources, len)) > len(prompt)


def test_unknown_tasks_and_buckets_are_named():
    with pytest.raises(prompts.EvalError, match="unknown task.*humaneval.*choose from repo_nextline"):
        prompts.parse_tasks(["humaneval"])
    with pytest.raises(prompts.EvalError, match="unknown bucket.*3k.*choose from 2k"):
        prompts.parse_buckets(["2k", "3k"])
    with pytest.raises(prompts.EvalError, match="file_nextline has no examples in bucket.*64k"):
        prompts.load_records(["file_nextline"], ["64k"])
