"""API-call recall: does the predicted line call the target API with the right number of arguments?"""
import datasets
import evaluate

from seekv4.eval.scoring import api_match, api_name_match

_DESCRIPTION = """Per example: `api_match` = 100 if the predicted line parses and its first call of the target
callee (`f` or `mod.f`, as written in the target) passes as many arguments (positional + keyword) as the target
line's first call of it; `api_name_match` = 100 if the predicted line calls the callee at all (textual). Averaged
over examples, in percent. Predictions are already-extracted lines (`seekv4.eval.scoring.extract_next_line`)."""
_KWARGS = """predictions: list of str, references: list of str (target lines), callees: list of str.
Returns {"api_match": float, "api_name_match": float} in 0-100."""


class ApiRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, callees):
        n = len(predictions)
        if len(callees) != n:
            raise ValueError(f"got {len(callees)} callees for {n} predictions; pass one callee per example.")
        return {"api_match": sum(map(api_match, predictions, references, callees)) / n,
                "api_name_match": sum(map(api_name_match, predictions, callees)) / n}
