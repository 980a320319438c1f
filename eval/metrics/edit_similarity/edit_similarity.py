"""Edit similarity of a predicted code line: normalised Indel similarity in percent (= rapidfuzz / thefuzz
`fuzz.ratio`, unrounded)."""
import datasets
import evaluate

from seekv4.eval.scoring import edit_similarity

_DESCRIPTION = """`edit_sim` = 100 * 2*LCS(pred, ref) / (len(pred) + len(ref)), averaged over examples. This equals
`rapidfuzz.fuzz.ratio` and `thefuzz.fuzz.ratio` (Long Code Arena) before rounding, and fuzzywuzzy's ratio when
python-Levenshtein is installed. LongBench v1 and RepoBench install fuzzywuzzy without it, so their published
numbers use difflib's SequenceMatcher (rounded to int), which differs per pair by up to tens of points."""
_KWARGS = """predictions: list of str, references: list of str. Returns {"edit_sim": float} in 0-100."""


class EditSimilarity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return {"edit_sim": sum(map(edit_similarity, predictions, references)) / len(predictions)}
