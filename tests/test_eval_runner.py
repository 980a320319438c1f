"""`seekv4 eval`: scoring pipeline, resumability, reports and user errors."""
import json
import math

import pytest
import torch

from seekv4.cli import main
from seekv4.eval import runner
from seekv4.eval.prompts import EvalError

TASKS = ["repo_nextline", "file_nextline", "code_needle"]
ALL_TASKS = TASKS + ["api_recall", "code_perplexity"]


def test_stop_conditions():
    nextline, needle = runner._stop_when("repo_nextline"), runner._stop_when("code_needle")
    assert not nextline("x)\n    y = f(")          # predicted line not finished
    assert nextline("x)\n    y = f(a)\n")
    assert not nextline("\n\n    # comment\n")     # only skipped lines so far
    assert not needle(" 12") and needle(" 12\n")


class FakeGenerate:
    """Answers every other record correctly (by record id, as the patched `render` passes the id as prompt)."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = [], fail_after

    def __call__(self, lm, prompt, task):
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(prompt)
        record = self.records[prompt]
        if record["id"] not in self.correct:
            return "", 7                                        # no newline: empty prediction, every score 0
        return ("\n" + record["answers"][0] + "\n" if task != "code_needle" else f" {record['answers'][0]}\n"), 7


@pytest.fixture
def fake(monkeypatch):
    from seekv4.eval.prompts import load_records

    records = load_records(ALL_TASKS, ["2k"], limit=2)
    gen = FakeGenerate()
    gen.records = {r["id"]: r for r in records}
    gen.correct = {r["id"] for i, r in enumerate(records) if i % 2 == 0}
    monkeypatch.setattr(runner, "render", lambda record, sources, count: record["id"])
    monkeypatch.setattr(runner, "generate", gen)
    return gen


def test_scores_resume_and_reports(fake, tmp_path):
    out = tmp_path / "run"
    fake.fail_after = 3
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval("tiny", TASKS, ["2k"], str(out), limit=2, progress=False)
    # interrupted: only the partial samples file, nothing that looks finished
    assert sorted(p.name for p in out.iterdir()) == ["samples.partial.jsonl"]
    assert len((out / "samples.partial.jsonl").read_text().splitlines()) == 3

    fake.fail_after = None
    results = runner.run_eval("tiny", TASKS, ["2k"], str(out), limit=2, progress=False)
    assert len(fake.calls) == 6                                # 3 before the interrupt + the 3 missing ones
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png", "samples.jsonl"]
    scores = results["scores"]
    # two records per task, the first answered exactly, the second with nothing
    for task in ("repo_nextline", "file_nextline"):
        row = scores[task]["2048"]
        assert (row["exact_match"], row["exact_match_strict"], row["edit_sim"], row["n"]) == (50.0, 50.0, 50.0, 2)
        assert row["prompt_tokens"] == 7
    assert scores["code_needle"]["2048"]["needle_accuracy"] == 50.0
    assert json.loads((out / "results.json").read_text())["scores"] == scores
    md = (out / "results.md").read_text()
    assert "| code_needle | needle_accuracy | 50.0 (n=2) |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = runner.run_eval("tiny", TASKS, ["2k"], str(out), limit=2, progress=False)
    assert len(fake.calls) == 6 and again["scores"] == scores  # finished run: nothing regenerated
    with pytest.raises(EvalError, match="different run.*new --output"):
        runner.run_eval("tiny", TASKS, ["2k"], str(out), limit=2, dtype="bfloat16", progress=False)


def test_api_recall_and_perplexity_scores(fake, tmp_path, monkeypatch):
    """Fake generations / NLLs: the first record of each task right (or NLLs [1, 2]), the second wrong ([3])."""
    nll_calls = []

    def fake_loglikelihood(lm, prompt, span):
        nll_calls.append(prompt)
        return ([1.0, 2.0] if prompt in fake.correct else [3.0]), 5

    monkeypatch.setattr(runner, "loglikelihood", fake_loglikelihood)
    results = runner.run_eval("tiny", ["api_recall", "code_perplexity"], ["2k"], str(tmp_path), limit=2,
                              progress=False)
    api, ppl = results["scores"]["api_recall"]["2048"], results["scores"]["code_perplexity"]["2048"]
    assert (api["api_match"], api["api_name_match"], api["exact_match"], api["n"]) == (50.0, 50.0, 50.0, 2)
    span_bytes = sum(len(r["target"].encode()) for r in fake.records.values() if r["task"] == "code_perplexity")
    assert ppl["nll"] == pytest.approx(2.0) and ppl["perplexity"] == pytest.approx(math.exp(2.0))
    assert ppl["bits_per_byte"] == pytest.approx(6.0 / span_bytes / math.log(2))
    assert (ppl["span_tokens"], ppl["prompt_tokens"], ppl["n"]) == (1.5, 5, 2) and len(nll_calls) == 2
    md = (tmp_path / "results.md").read_text()
    assert "| code_perplexity | perplexity | 7.389 (n=2) |" in md and "| api_recall | api_match | 50.0 (n=2) |" in md
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["definition_in_prompt"] for s in samples if s["task"] == "api_recall"] == [False, False]  # prompt=id
    # one model per folder: other tasks of another dtype are refused too
    with pytest.raises(EvalError, match="different run.*new --output"):
        runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=1, dtype="bfloat16", progress=False)


class CharTokenizer:
    """Characters a, b, c, newline -> ids 0-3 (a `special_ids` tokenizer, as LoadedModel expects of ByteTokenizer)."""
    special_ids = set()
    chars = "abc\n"

    def encode(self, text):
        return [self.chars.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


class RepeatModel(torch.nn.Module):
    """Next-token distribution: the previous token with p = 1/2, each of the other 3 with p = 1/6."""

    def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):
        probs = torch.full((*input_ids.shape, 4), 1 / 6).scatter(-1, input_ids[..., None], 0.5)
        logits = probs.log()[:, -logits_to_keep:]
        return type("Out", (), {"logits": logits})


def test_loglikelihood_with_known_logits():
    from seekv4.eval.models import LoadedModel

    lm = LoadedModel(RepeatModel(), CharTokenizer(), "repeat", 16)
    # tokens a b | \n \n a: predicted after b, \n, \n -> p 1/6, 1/2, 1/6
    nlls, n_context = runner.loglikelihood(lm, "ab", "\n\na")
    assert n_context == 2 and nlls == pytest.approx([math.log(6), math.log(2), math.log(6)])
    # trailing whitespace of the context moves to the span (lm-eval's _encode_pair): same tokens scored
    assert runner.loglikelihood(lm, "ab\n", "\na") == (nlls, 2)


def test_real_generation_on_tiny_model(tmp_path):
    results = runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=1, progress=False)
    (sample,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert 2048 - 16 - 40 < sample["prompt_tokens"] <= 2048 - 16   # byte tokens: the budget is filled
    assert len(sample["generation"]) <= 16                        # 16 new byte tokens at most
    assert results["scores"]["code_needle"]["2048"]["n"] == 1


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--tasks", "humaneval"], "unknown task(s) humaneval; choose from repo_nextline"),
    (["--model", "/no/such/model"], "model '/no/such/model' does not exist"),
    (["--model", "tiny", "--buckets", "2k", "4k"], "bucket(s) 4k exceed the context of tiny (2048 tokens"),
    (["--model", "tiny", "--buckets", "5k"], "unknown bucket(s) 5k"),
    (["--model", "deepseek-v3"], "preset deepseek-v3 has 671,026,404,352 parameters"),
])
def test_cli_errors_leave_no_results(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["eval", *args, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seekv4 eval: error: ") and message in err
    assert not out.exists()
