"""lm-eval task definitions of the seekv4 benchmarks: `python -m seekv4.eval.lm_eval_cli run --include_path <this
folder>` (`lm_eval run` also works for models that are not seekv4; see ../lm_eval_cli.py and utils.py)."""
import pathlib

TASKS_DIR = str(pathlib.Path(__file__).resolve().parent)
