"""Needle-in-a-haystack accuracy: share of needle values found in the answer (RULER `string_match_all`)."""
import datasets
import evaluate

from seekv4.eval.scoring import needle_accuracy

_DESCRIPTION = """Per example: the share of reference strings found case-insensitively in the prediction; averaged
over examples, in percent. Pass the answer's first line as the prediction."""
_KWARGS = """predictions: list of str, references: list of list of str. Returns {"needle_accuracy": float}."""


class NeedleAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references):
        return {"needle_accuracy": sum(map(needle_accuracy, predictions, references)) / len(predictions)}
