"""lm-eval glue: the same records, prompts (cropped with the evaluated model's tokenizer) and scoring as
`seekv4 eval`, so both routes give the same scores on the same model and examples.

The dataset loader receives lm-eval's `--model_args` merged with `--metadata`: it takes the tokenizer from
`tokenizer` or `pretrained` (+ `gguf_file`), and `buckets` (default ["2k"]) and `limit` (per task and bucket,
default all) from the metadata, e.g. `--metadata '{"buckets": ["2k", "4k"], "limit": 10}'`.
"""
import functools

from seekv4.eval.prompts import load_records, load_sources, parse_buckets, render
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
    for r in records:
        r["prompt"] = render(r, sources, lambda text: len(tok(text)["input_ids"]))
    return {"test": datasets.Dataset.from_list(records)}


load_repo_nextline = functools.partial(_load, "repo_nextline")
load_file_nextline = functools.partial(_load, "file_nextline")
load_code_needle = functools.partial(_load, "code_needle")


def process_results(doc, results):
    return score_sample(doc["task"], results[0], doc["answers"])[1]

