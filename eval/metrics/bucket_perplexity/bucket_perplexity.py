"""Token-weighted negative log-likelihood and perplexity, overall and per context-length bucket."""
import datasets
import evaluate

from seekv4.eval.scoring import bucket_nll

_DESCRIPTION = """Each example is the list of per-token NLLs (nats) of its scored tokens and its bucket label.
Returns `nll`/`perplexity` over all tokens and `nll_<bucket>`/`perplexity_<bucket>` per bucket, token-weighted."""
_KWARGS = """predictions: list of list of float (per-token NLL), references: list of str (bucket labels)."""


class BucketPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return bucket_nll(predictions, references)
