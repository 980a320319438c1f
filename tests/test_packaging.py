"""`pip install .` ships every sub-package under the one import name `seekv4`, and nothing else."""
import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = tmp_path.glob("seekv4-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("__init__.py", "cli.py", "convert.py", "configuration/configuration_seekv4.py",
                   "modeling/modeling_seekv4.py", "modeling/moe.py", "tokenization/__init__.py", "eval/__init__.py"):
        assert f"seekv4/{module}" in names
    for data in ("eval/data/tasks.jsonl", "eval/data/sources.jsonl", "eval/data/manifest.json",
                 "eval/metrics/edit_similarity/edit_similarity.py", "eval/metrics/code_exact_match/code_exact_match.py",
                 "eval/metrics/needle_accuracy/needle_accuracy.py",
                 "eval/metrics/bucket_perplexity/bucket_perplexity.py",
                 "eval/metrics/api_recall/api_recall.py", "eval/lm_eval_tasks/seekv4_api_recall.yaml",
                 "eval/lm_eval_tasks/seekv4_code_perplexity.yaml",
                 "eval/lm_eval_tasks/seekv4_repo_nextline.yaml", "eval/lm_eval_tasks/utils.py",
                 "modeling/indexer_topk.c"):
        assert f"seekv4/{data}" in names, data
    assert "seekv4/setup.py" not in names
    assert not any(n.startswith(("seekv4/tests", "seekv4/bench", "tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "seekv4 = seekv4.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
