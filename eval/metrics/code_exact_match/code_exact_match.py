"""Exact match of a predicted code line, RepoBench-style (whitespace-split) and Long-Code-Arena-style (stripped)."""
import datasets
import evaluate

from seekv4.eval.scoring import exact_match, exact_match_strict

_DESCRIPTION = """`exact_match`: `pred.split() == ref.split()` (RepoBench v1.1). `exact_match_strict`:
`pred.strip() == ref.strip()` (Long Code Arena). Both in percent, averaged over examples. Predictions are
already-extracted lines (see `seekv4.eval.scoring.extract_next_line`)."""
_KWARGS = """predictions: list of str, references: list of str.
Returns {"exact_match": float, "exact_match_strict": float} in 0-100."""


class CodeExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        n = len(predictions)
        return {"exact_match": sum(map(exact_match, predictions, references)) / n,
                "exact_match_strict": sum(map(exact_match_strict, predictions, references)) / n}
