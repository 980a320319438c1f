"""The `seekv4 build-benchmarks` and `seekv4 eval` commands (cli.py only parses arguments)."""
from __future__ import annotations

import json
import pathlib
import platform
import tempfile

from .build import DATA_DIR, build
from .prompts import EvalError


def split_list(values) -> list[str]:
    """`--tasks a b,c` -> [a, b, c]."""
    return [v for value in values for v in value.split(",") if v]


def build_benchmarks(out: str | None, check: bool) -> int:
    """Rebuild into `out` (default: the shipped data folder); with `check`, compare the rebuilt files' sha256
    with the shipped manifest instead of replacing anything unless `out` is given."""
    shipped = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
    if check and shipped["python_version"] != platform.python_version():
        raise EvalError(f"the shipped benchmarks were built from the CPython {shipped['python_version']} standard "
                        f"library; this is {platform.python_version()}, whose sources differ. Run the check "
                        f"with Python {shipped['python_version']}.")
    with tempfile.TemporaryDirectory() as tmp:
        target = pathlib.Path(out) if out else (pathlib.Path(tmp) if check else DATA_DIR)
        manifest = build(target)
        for name, sha in manifest["files"].items():
            print(f"{sha}  {target / name}")
        if not check:
            return 0
        diff = [n for n in shipped["files"] if shipped["files"][n] != manifest["files"].get(n)]
        diff += [p for p in shipped["sources"] if shipped["sources"][p] != manifest["sources"].get(p)]
        if diff:
            print(f"MISMATCH with the shipped manifest: {', '.join(diff)}")
            return 1
        print("OK: rebuilt files are byte-identical to the shipped manifest")
        return 0


def eval_command(model, tasks, buckets, output, limit, dtype, overwrite=False) -> int:
    from .runner import run_eval

    run_eval(model, split_list(tasks), split_list(buckets), output, limit, dtype, overwrite=overwrite)
    out = pathlib.Path(output)
    print((out / "results.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}, {out / 'samples.jsonl'}")
    return 0
