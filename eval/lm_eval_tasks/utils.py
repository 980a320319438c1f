"""lm-eval glue: the same records, prompts (cropped with the evaluated model's tokenizer) and scoring as
`seekv4 eval`, so both routes give the same scores on the same model and examples.

The dataset loader receives lm-eval's `--model_args` merged with `--metadata`: it takes the tokenizer from
`tokenizer` or `pretrained` (+ `gguf_file`), and `buckets` (default ["2k"]) and `limit` (per task and bucket,
default all) from the metadata, e.g. `--metadata '{"buckets": ["2k", "4k"], "limit": 10}'`.

Scores are aggregated over all selected buckets: pass one bucket per run for a per-bucket number.

`seekv4_code_perplexity` uses `output_type: loglikelihood` (context = the cropped prompt, continuation = the
record's fixed span): it scores exactly the span tokens `seekv4 eval` scores. `loglikelihood_rolling` does not
fit this task: it scores a whole document in disjoint max_length windows, so each token's context runs from 0
up to max_length tokens and no "same span after a bucket-sized context" measurement can be expressed with it.
"""
import functools

from seekv4.eval.prompts import load_records, load_sources, parse_buckets, perplexity_pair, render
from seekv4.eval.runner import score_sample


@functools.cache
def _tokenizer(name, gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, **({"gguf_file": gguf_file} if gguf_file else {}))


def _load(task, buckets=("2k",), limit=None, tokenizer=None, pretrained=None, gguf_file=None, **_):
    import datasets

    name = tokenizer or pretrained
    if not isinstance(name, str) or not name:
        raise ValueError("seekv4 lm-eval tasks crop prompts with the model's tokenizer: pass "
                         "`--model_args pretrained=<folder>` (or tokenizer=<folder>).")
    tok = _tokenizer(name, gguf_file)
    sources = load_sources()
    records = load_records([task], parse_buckets(list(buckets)), int(limit) if limit else None)
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
    for r in records:
        r["prompt"] = render(r, sources, count)
        if task == "code_perplexity":   # span tokens as lm-eval's _encode_pair splits them (for the aggregation)
            context, span = perplexity_pair(r["prompt"], r["target"])
            r["span_tokens"] = count(context + span) - count(context)
            r["span_bytes"] = len(r["target"].encode("utf-8"))
    return {"test": datasets.Dataset.from_list(records)}


load_repo_nextline = functools.partial(_load, "repo_nextline")
load_file_nextline = functools.partial(_load, "file_nextline")
load_code_needle = functools.partial(_load, "code_needle")
load_api_recall = functools.partial(_load, "api_recall")
load_code_perplexity = functools.partial(_load, "code_perplexity")


def process_results(doc, results):
    return score_sample(doc["task"], results[0], doc["answers"], doc["query"])[1]


def process_perplexity(doc, results):
    """results[0] = (log-likelihood of the span, is_greedy). Token- and byte-weighted pairs for lm-eval's
    `weighted_perplexity` / `bits_per_byte` aggregations and `nll` below."""
    loglik = results[0][0]
    return {"perplexity": (loglik, doc["span_tokens"]), "bits_per_byte": (loglik, doc["span_bytes"]),
            "nll": (loglik, doc["span_tokens"])}


def nll(items):
    """Token-weighted mean NLL (nats/token) = log of lm-eval's weighted_perplexity."""
    logliks, tokens = zip(*items)
    return -sum(logliks) / sum(tokens)

