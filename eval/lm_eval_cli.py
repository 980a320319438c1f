"""`python -m seekv4.eval.lm_eval_cli ARGS`: lm-eval's command line (`lm_eval ARGS`) with seekv4 imported first.

lm-eval's `hf` model loads a folder with transformers' Auto classes, which know `model_type: seekv4` only once
`seekv4` is imported. Plain `lm_eval` never imports it in time: it builds the model before it imports the task
glue of `--include_path` (lm_eval_tasks/utils.py, which imports seekv4), and lm-eval 0.4 has no plugin entry
point for models. Other architectures load the same with either command.
"""
import sys

import seekv4  # noqa: F401  (registers model_type "seekv4" with AutoConfig and AutoModelForCausalLM)


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]   # lm-eval parses sys.argv itself
    cli_evaluate()


if __name__ == "__main__":
    main()
