"""Scoring functions and the `evaluate` metric modules, against hand-computed values."""
import json
import math
import os
import subprocess
import sys

import pytest

from seekv4.eval import scoring
from seekv4.eval.metrics import METRICS, metric_path


def lcs(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for ca in a:
        prev, row = row, [0]
        for j, cb in enumerate(b):
            row.append(prev[j] + 1 if ca == cb else max(prev[j + 1], row[j]))
    return row[-1]


@pytest.mark.parametrize("pred, ref, expected", [
    ("abc", "abd", 100 * 4 / 6),                # LCS "ab"
    ("kitten", "sitting", 100 * 8 / 13),        # LCS "ittn"
    ("x = 1", "x = 1", 100.0),
    ("", "return x", 0.0),
    ("", "", 100.0),
])
def test_edit_similarity_is_indel_ratio(pred, ref, expected):
    assert scoring.edit_similarity(pred, ref) == pytest.approx(expected)
    if pred or ref:
        assert scoring.edit_similarity(pred, ref) == pytest.approx(200 * lcs(pred, ref) / (len(pred) + len(ref)))


def test_exact_match_styles():
    assert scoring.exact_match("  x  =  f(a, b)", "x = f(a,  b)") == 100.0          # RepoBench: tokens only
    assert scoring.exact_match("x = f(a,b)", "x = f(a, b)") == 0.0
    assert scoring.exact_match_strict("    return x  ", "return x") == 100.0         # LCA: outer strip only
    assert scoring.exact_match_strict("return  x", "return x") == 0.0


@pytest.mark.parametrize("generation, line", [
    ("  # trailing comment\n    y = f(x)\n    z", "    y = f(x)"),   # continuation of the previous line dropped
    ("\n\n\n    # note\n    y = 1\n", "    y = 1"),                   # blank and comment lines skipped
    ('\n    """Doc\n    more.\n    """\n    z()\n', "    z()"),         # multi-line docstring skipped
    ("\n    '''one line'''\n    q()", "    q()"),                      # one-line docstring skipped
    (" no newline at all", ""),
    ("\n\n# only comments\n", ""),
])
def test_extract_next_line(generation, line):
    assert scoring.extract_next_line(generation) == line


def test_needle_accuracy_and_first_line():
    assert scoring.first_line(" 4821937\nassert x") == " 4821937"
    assert scoring.needle_accuracy(" 4821937", ["4821937"]) == 100.0
    assert scoring.needle_accuracy("VALUE abc", ["abc", "def"]) == 50.0              # case-insensitive, share found
    assert scoring.needle_accuracy("482193", ["4821937"]) == 0.0


def test_api_call_scores():
    ref = "        total = helper(value, LIMIT)"
    assert scoring.api_match("    total = helper(x, limit=3)", ref, "helper") == 100.0   # name + 2 arguments
    assert scoring.api_match("    total = helper(x)", ref, "helper") == 0.0              # wrong argument count
    assert scoring.api_match("    total = helper(x,", ref, "helper") == 0.0              # does not parse
    assert scoring.api_match("    total = other(helper(a), b)", ref, "helper") == 0.0    # first helper call: 1 arg
    assert scoring.api_match("x = m.helper(1, 2)", "m.helper(a, b)", "m.helper") == 100.0
    assert scoring.api_name_match("    total = helper(x,", "helper") == 100.0           # textual
    assert scoring.api_name_match("y = self.helper (x)", "helper") == 0.0               # another object's method
    assert scoring.api_name_match("y = helper (x)", "helper") == 100.0
    assert scoring.api_name_match("y = m.helper(x)", "m.helper") == 100.0
    with pytest.raises(ValueError, match="no call of 'helper'"):
        scoring.api_match("x", "x = 1", "helper")


def test_bucket_nll():
    out = scoring.bucket_nll([[1.0, 2.0], [0.5], [3.0]], ["2048", "4096", "2048"])
    assert out["nll"] == pytest.approx(6.5 / 4)
    assert out["nll_2048"] == pytest.approx(2.0) and out["perplexity_2048"] == pytest.approx(math.exp(2.0))
    assert out["nll_4096"] == pytest.approx(0.5) and out["perplexity"] == pytest.approx(math.exp(6.5 / 4))
    with pytest.raises(ValueError, match="no scored tokens"):
        scoring.bucket_nll([[]], ["2048"])


LOAD_SCRIPT = r"""
import json, sys, evaluate
paths = json.loads(sys.argv[1])
em, es, na, bp, api = (evaluate.load(paths[m]) for m in ("code_exact_match", "edit_similarity", "needle_accuracy",
                                                          "bucket_perplexity", "api_recall"))
out = {"em": em.compute(predictions=["  x = 1", "y"], references=["x  =  1", "z"]),
       "combo": evaluate.combine([em, es]).compute(predictions=["abc", "x"], references=["abd", "x"]),
       "na": na.compute(predictions=[" 123", "no"], references=[["123"], ["9", "no"]]),
       "bp": bp.compute(predictions=[[1.0, 3.0], [2.0]], references=["2k", "4k"]),
       "api": api.compute(predictions=["f(1, 2)", "g(1)", "f(1,"], references=["f(a, b)", "g(a, b)", "f(a, b)"],
                          callees=["f", "g", "f"])}
es.add_batch(predictions=["kitten"], references=["sitting"])
es.add(prediction="a", reference="a")
out["incremental"] = es.compute()
print(json.dumps(out))
"""


def test_metric_modules_load_offline_and_combine(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    paths = json.dumps({m: metric_path(m) for m in METRICS})
    proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, paths], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["em"] == {"exact_match": 50.0, "exact_match_strict": 0.0}
    assert out["combo"] == pytest.approx({"exact_match": 50.0, "exact_match_strict": 50.0,
                                          "edit_sim": (100 * 4 / 6 + 100) / 2})
    assert out["na"] == {"needle_accuracy": 75.0}
    assert out["bp"] == pytest.approx({"nll": 2.0, "perplexity": math.exp(2.0), "nll_2k": 2.0,
                                       "perplexity_2k": math.exp(2.0), "nll_4k": 2.0, "perplexity_4k": math.exp(2.0)})
    assert out["api"] == pytest.approx({"api_match": 100 / 3, "api_name_match": 100.0})
    assert out["incremental"]["edit_sim"] == pytest.approx((100 * 8 / 13 + 100) / 2)


def test_metric_path_rejects_unknown_names():
    with pytest.raises(ValueError, match="available: code_exact_match"):
        metric_path("bleu")
