"""Long-context code benchmarks for any causal LM.

`build` (deterministic benchmark builder) -> `data/` (JSONL + manifest) -> `prompts` (records to prompts, cropped
with the evaluated model's tokenizer) -> `runner` (greedy generation, resumable) -> `scoring` (shared metric
functions, exposed as `evaluate` modules in `metrics/` and as lm-eval tasks in `lm_eval_tasks/`) -> `report`.
"""
