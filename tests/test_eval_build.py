"""Benchmark builder (line categories, determinism, shipped hashes) and prompt assembly / cropping."""
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
    for r in records:
        if r["task"] != "code_needle":   # targets are real lines of the shipped sources
            assert sources[r["target_file"]].split("\n")[r["target_line"] - 1] == r["target"] == r["answers"][0]
    counts = manifest["counts"]
    assert counts["repo_nextline"]["2048"] >= 60 and counts["code_needle"]["131072"] == 10
    assert {r["category"] for r in records if r["task"] == "repo_nextline"} == set(build.REPO_CATEGORIES)


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
    assert budget - 400 < len(prompt) <= budget
    if task == "code_needle":
        assert record["needle"] in prompt and prompt.endswith("\n" + record["query"])
    else:
        prefix = prompts.target_prefix(sources[record["target_file"]], record["target_line"])
        # ends at the end of the previous non-blank line, never with a newline
        assert prompt.endswith(prefix[-200:]) and not prompt.endswith("\n")
        if task == "repo_nextline":
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
