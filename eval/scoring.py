"""Scoring functions shared by the `evaluate` metric modules, the lm-eval tasks and `seekv4 eval`.

All scores are percentages (0-100), as in the published LongBench / RepoBench / Long Code Arena tables.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

from rapidfuzz.distance import Indel

from .build import first_call_in_line


def extract_next_line(generation: str) -> str:
    """The predicted next line: prompts end at the end of the previous line (no trailing newline), so the
    prediction starts after the first generated newline; blank, `#` comment and docstring-delimiter lines are
    skipped (RepoBench `get_first_line_not_comment`). Indentation is kept. No newline generated -> ""."""
    _, newline, rest = generation.partition("\n")
    if not newline:
        return ""
    lines = rest.split("\n")
    in_docstring = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(('"""', "'''")):
            # a one-line docstring opens and closes on the same line
            if not (len(stripped) >= 6 and stripped.endswith(stripped[:3])):
                in_docstring = not in_docstring
            continue
        if in_docstring or not stripped or stripped.startswith("#"):
            continue
        return line
    return ""


def first_line(generation: str) -> str:
    """The generation up to its first newline (needle answers)."""
    return generation.split("\n", 1)[0]


def exact_match(prediction: str, reference: str) -> float:
    """RepoBench EM: equal whitespace-split tokens (indentation and spacing ignored)."""
    return 100.0 * (prediction.split() == reference.split())


def exact_match_strict(prediction: str, reference: str) -> float:
    """Long Code Arena EM: equal after `.strip()` (inner spacing counts)."""
    return 100.0 * (prediction.strip() == reference.strip())


def edit_similarity(prediction: str, reference: str) -> float:
    """Normalised Indel similarity x100 = 2*LCS/(|p|+|r|)*100 = `rapidfuzz.fuzz.ratio` = `thefuzz.fuzz.ratio`
    (unrounded). fuzzywuzzy without python-Levenshtein, as LongBench v1 and RepoBench install it, uses difflib
    instead and rounds to int: it can differ by tens of points per pair. Both empty -> 100 (identical)."""
    return 100.0 * Indel.normalized_similarity(prediction, reference)


def needle_accuracy(prediction: str, references: list[str]) -> float:
    """RULER `string_match_all`: the share of reference strings found, case-insensitively, in the prediction."""
    found = sum(ref.lower() in prediction.lower() for ref in references)
    return 100.0 * found / len(references)


def api_name_match(prediction: str, callee: str) -> float:
    """api_recall: 100 if the predicted line calls `callee` as written in the target (`f` or `mod.f`; `x.f(`
    does not count for `f`), else 0. Textual, so it also credits lines that do not parse."""
    return 100.0 * bool(re.search(r"(?<![\w.])" + re.escape(callee) + r"\s*\(", prediction))


def api_match(prediction: str, reference: str, callee: str) -> float:
    """api_recall's main score (docs/evaluation.md#api-recall):
    100 if the predicted line parses and its first call of `callee` passes as many arguments (positional +
    keyword) as the target line's first call of `callee`, else 0. Argument values are not compared (EM and
    edit similarity of the whole line cover them)."""
    ref = first_call_in_line(reference, callee)
    if ref is None:
        raise ValueError(f"reference line {reference!r} has no call of {callee!r}")
    return 100.0 * (first_call_in_line(prediction, callee) == ref)


def bucket_nll(token_nlls: list[list[float]], buckets: list[str]) -> dict[str, float]:
    """Token-weighted mean negative log-likelihood (nats/token) and perplexity, overall and per bucket.
    token_nlls[i]: the per-token NLLs of example i; buckets[i]: its bucket label."""
    sums, counts = defaultdict(float), defaultdict(int)
    for nlls, bucket in zip(token_nlls, buckets, strict=True):
        for key in ("", f"_{bucket}"):
            sums[key] += sum(nlls)
            counts[key] += len(nlls)
    out = {}
    for key in sorted(sums, key=lambda k: (k != "", k)):
        if counts[key] == 0:
            raise ValueError(f"bucket {key.lstrip('_') or 'overall'} has no scored tokens")
        nll = sums[key] / counts[key]
        out[f"nll{key}"], out[f"perplexity{key}"] = nll, math.exp(nll)
    return out
