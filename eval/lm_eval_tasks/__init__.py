"""lm-eval task definitions of the seekv4 benchmarks: `lm_eval run --include_path <this folder>` (see utils.py)."""
import pathlib

TASKS_DIR = str(pathlib.Path(__file__).resolve().parent)
