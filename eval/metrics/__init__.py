"""`evaluate` metric modules, one folder each (`<name>/<name>.py`), loaded offline by absolute path:
`evaluate.load(seekv4.eval.metrics.metric_path("edit_similarity"))`."""
from __future__ import annotations

import pathlib

METRICS = ("code_exact_match", "edit_similarity", "needle_accuracy", "bucket_perplexity", "api_recall")


def metric_path(name: str) -> str:
    """Absolute folder of a metric module (a relative path would be looked up on the Hub)."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return str(pathlib.Path(__file__).resolve().parent / name)
