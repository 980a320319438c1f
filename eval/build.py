"""Deterministic builder of the long-context code benchmarks from the CPython standard library.

Output (in `eval/data/` by default), rebuilt byte-identically by `seekv4 build-benchmarks`:
- `sources.jsonl`: every source file used, once: {"path", "sha256", "text"} (so evaluation never depends on the
  installed interpreter);
- `tasks.jsonl`: one record per (task, bucket, example), referencing sources by path; prompts are assembled
  and cropped with the evaluated model's tokenizer at evaluation time (`prompts.py`);
- `manifest.json`: origin, builder version, seed, per-source, per-output and per-task sha256 (`task_sha256`:
  the sha256 of that task's lines of tasks.jsonl, which `seekv4 eval` uses to decide whether saved samples are
  still valid), counts per task and bucket.

Tasks: `repo_nextline`, `file_nextline`, `code_needle` (builder v1, unchanged since) and, added in v2,
`api_recall` (`build_api_recall`) and `code_perplexity` (`build_code_perplexity`).

Every choice is a pure function of the sorted inputs and sha256 keys: no set/dict-order or RNG-state dependence.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import platform
import sysconfig
from collections import Counter

BUILDER_VERSION = 2
SEED = 0
DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
OUTPUT_FILES = ("sources.jsonl", "tasks.jsonl")
BUCKETS = {"2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768, "64k": 65536, "128k": 131072}
# A record enters bucket B only if its full context has >= B * CHARS_PER_TOKEN chars: code BPEs average
# ~3.5 chars/token (SmolLM2: 3.53 on the stdlib), so a cropped prompt fills the budget for typical tokenizers.
CHARS_PER_TOKEN = 3.5
REPOS = ("asyncio", "concurrent", "distutils", "email", "http", "importlib", "json", "logging",
         "multiprocessing", "unittest", "urllib", "xml")
LONG_FILES = ("_pydecimal.py", "inspect.py", "pydoc.py", "tarfile.py", "turtle.py", "typing.py")
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
TASK_ORDER = ("repo_nextline", "file_nextline", "code_needle", "api_recall", "code_perplexity")
REPO_CATEGORIES = ("cross_file_first", "cross_file", "in_file")
PER_REPO_CATEGORY = 3        # repo_nextline examples per (repo, category)
PER_FILE_BUCKET = 4          # file_nextline examples per (file, bucket)
NEEDLE_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NEEDLES_PER_DEPTH = 2        # one function needle, one constant needle
MIN_TARGET_CHARS = 8         # non-space chars of a target line
API_MIN_ARGS = 2             # api_recall: the target call passes >= 2 arguments (positional + keyword)
API_PER_REPO_BUCKET = 4      # api_recall examples per (repo, bucket)
# api_recall keeps a record in a bucket only if the defining file from its definition on and the target prefix
# (the part cropping must not drop) fit the budget even at 2.5 chars/token, i.e. for any usual code BPE (SmolLM2: 3.53);
# byte-level tokenizers (1 char/token) may crop the definition away: samples record `definition_in_prompt`.
API_KEEP_CHARS_PER_TOKEN = 2.5
API_MAX_NEW_TOKENS = 64      # = prompts.MAX_NEW_TOKENS["api_recall"], kept out of the budget above
PPL_CHARS = 1024             # code_perplexity: scored span = the shortest line-aligned file tail of >= this many chars
PPL_FILES_PER_REPO = 2       # code_perplexity target files per repo (each scored at every bucket it fills)


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, (SEED, *parts))).encode()).hexdigest()


def stdlib_sources() -> dict[str, str]:
    """path relative to the stdlib -> text, for every file the benchmarks may use."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    paths = [root / name for name in LONG_FILES]
    for repo in REPOS:
        for folder, dirs, files in os.walk(root / repo):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
            paths += [pathlib.Path(folder) / f for f in sorted(files) if f.endswith(".py")]
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(paths)}


def repo_files(sources: dict[str, str], repo: str) -> list[str]:
    return sorted(p for p in sources if p.startswith(repo + "/"))


def _statement_lines(tree: ast.AST) -> dict[int, ast.stmt]:
    """First line -> statement, for simple statements that fit on one line (compound headers excluded:
    their first line is not a complete statement)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and node.lineno == node.end_lineno and not isinstance(
                node, (ast.Import, ast.ImportFrom, ast.Pass, ast.Break, ast.Continue)):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # docstrings and bare constants
            out[node.lineno] = node
    return out


def _intra_repo_imports(tree: ast.AST, path: str, repo_paths: set[str]) -> dict[str, str]:
    """Local name -> repo file it comes from, for `from .x import a`, `from . import x`, `from pkg.x import a`."""
    package = path.rsplit("/", 1)[0].split("/")
    names = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package[:len(package) - node.level + 1] if node.level else []
        module = base + (node.module.split(".") if node.module else [])
        for alias in node.names:
            local = alias.asname or alias.name
            for candidate in ("/".join(module + [alias.name]), "/".join(module)):
                for file in (candidate + ".py", candidate + "/__init__.py"):
                    if file in repo_paths and file != path:
                        names.setdefault(local, file)
    return names


def _definitions(tree: ast.Module) -> dict[str, int]:
    """Top-level def/class/assigned name -> first line defining it."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out.setdefault(target.id, node.lineno)
    return out


def _loaded_names(node: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]


def classify_lines(text: str, path: str, repo_paths: set[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """([(line number, category)], imported repo files) for candidate target lines of one file.

    cross_file_first: the line is the file's first use of a name imported from another repo file;
    cross_file: a later use of such a name; in_file: uses a name defined earlier in this file (and none
    imported from the repo). Lines with neither are not candidates."""
    tree = ast.parse(text)
    lines = text.split("\n")
    imports = _intra_repo_imports(tree, path, repo_paths)
    defined = _definitions(tree)
    first_use = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in imports:
            first_use[node.id] = min(first_use.get(node.id, node.lineno), node.lineno)
    out = []
    for lineno, stmt in sorted(_statement_lines(tree).items()):
        if lineno < 2 or len("".join(lines[lineno - 1].split())) < MIN_TARGET_CHARS:
            continue
        used = _loaded_names(stmt)
        cross = [n for n in used if n in imports]
        if cross:
            out.append((lineno, "cross_file_first" if any(first_use[n] == lineno for n in cross) else "cross_file"))
        elif any(defined.get(n, lineno) < lineno for n in used):
            out.append((lineno, "in_file"))
    return out, sorted(set(imports.values()))


def prefix_lengths(text: str) -> list[int]:
    """[n] = length of the in-file prompt part for target line n (1-based): the text up to the end of the
    last non-blank line before line n (the prompt never ends in a newline)."""
    out, end, pos = [0, 0], 0, 0
    for line in text.split("\n"):
        pos += len(line)
        if line.strip():
            end = pos
        out.append(end)
        pos += 1
    return out


def _record(task, bucket, key, *, category="", repo="", context_files=(), target_file="", target_line=0,
            target="", needle="", depth=0.0, query="", answers=()) -> dict:
    return {"id": f"{task}/{bucket}/{key}", "task": task, "bucket": BUCKETS[bucket], "category": category,
            "repo": repo, "context_files": list(context_files), "target_file": target_file,
            "target_line": target_line, "target": target, "needle": needle, "depth": depth, "query": query,
            "answers": list(answers)}


def _buckets_for(chars: int) -> list[str]:
    return [b for b, tokens in BUCKETS.items() if chars >= tokens * CHARS_PER_TOKEN]


def build_repo_nextline(sources: dict[str, str]) -> list[dict]:
    """RepoBench-style next line: cross-file context (other repo files, imported ones nearest the target),
    then the target file's prefix."""
    records = []
    for repo in REPOS:
        paths = repo_files(sources, repo)
        path_set = set(paths)
        candidates = {c: [] for c in REPO_CATEGORIES}
        imported_by = {}
        for path in paths:
            lines, imported_by[path] = classify_lines(sources[path], path, path_set)
            for lineno, category in lines:
                candidates[category].append((_key("repo", path, lineno), path, lineno))
        for category in REPO_CATEGORIES:
            for _, path, lineno in sorted(candidates[category])[:PER_REPO_CATEGORY]:
                near = imported_by[path]
                far = [p for p in paths if p != path and p not in near]
                context = far + near  # prompt order: cropping drops from the front, so farthest first
                chars = sum(len(sources[p]) for p in context) + prefix_lengths(sources[path])[lineno]
                target = sources[path].split("\n")[lineno - 1]
                for bucket in _buckets_for(chars):
                    records.append(_record("repo_nextline", bucket, f"{path}:{lineno}", category=category,
                                           repo=repo, context_files=context, target_file=path,
                                           target_line=lineno, target=target, answers=[target]))
    return records


def build_file_nextline(sources: dict[str, str]) -> list[dict]:
    """LCC-style next line in one long file, no cross-file context: the control for repo_nextline."""
    records = []
    for path in LONG_FILES:
        text = sources[path]
        statements = sorted(_statement_lines(ast.parse(text)))
        lines, prefix = text.split("\n"), prefix_lengths(text)
        for bucket, tokens in BUCKETS.items():
            eligible = [n for n in statements if prefix[n] >= tokens * CHARS_PER_TOKEN
                        and len("".join(lines[n - 1].split())) >= MIN_TARGET_CHARS]
            for _, lineno in sorted((_key("file", path, bucket, n), n) for n in eligible)[:PER_FILE_BUCKET]:
                target = lines[lineno - 1]
                records.append(_record("file_nextline", bucket, f"{path}:{lineno}", category="in_file",
                                       repo=path, target_file=path, target_line=lineno, target=target,
                                       answers=[target]))
    return records


def build_code_needle(sources: dict[str, str]) -> list[dict]:
    """A function or constant with a 7-digit value hidden at a depth of a real-code haystack; the query at
    the end asks for the value."""
    records = []
    for bucket, tokens in BUCKETS.items():
        repos = [r for r in REPOS if sum(len(sources[p]) for p in repo_files(sources, r)) >= tokens * CHARS_PER_TOKEN]
        for depth in NEEDLE_DEPTHS:
            for i in range(NEEDLES_PER_DEPTH):
                h = _key("needle", bucket, depth, i)
                repo = repos[int(h[:8], 16) % len(repos)]
                number, value = int(h[8:16], 16) % 90000 + 10000, str(int(h[16:24], 16) % 9000000 + 1000000)
                if i % 2 == 0:
                    name = f"get_magic_number_{number}"
                    needle, query = f"def {name}():\n    return {value}\n", f"assert {name}() =="
                else:
                    name = f"MAGIC_NUMBER_{number}"
                    needle, query = f"{name} = {value}\n", f"assert {name} =="
                records.append(_record("code_needle", bucket, f"{depth}-{i}", category=f"depth_{depth}",
                                       repo=repo, context_files=repo_files(sources, repo), target=value,
                                       needle=needle, depth=depth, query=query, answers=[value]))
    return records


def _module_imports(tree: ast.AST, path: str, repo_paths: set[str]) -> dict[str, str]:
    """Local name -> repo file, for names bound to a repo *module* (`from . import events`, `from .x import y`
    where y is a submodule): `name.f(...)` then calls f of that file."""
    package = path.rsplit("/", 1)[0].split("/")
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            for alias in node.names:
                candidate = "/".join(module + [alias.name])
                for file in (candidate + ".py", candidate + "/__init__.py"):
                    if file in repo_paths and file != path:
                        names.setdefault(alias.asname or alias.name, file)
    return names


def _top_level_callables(tree: ast.Module) -> dict[str, ast.AST]:
    """Top-level function / class name -> its definition node (first one)."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.setdefault(node.name, node)
    return out


def api_calls(text: str, path: str, repo_paths: set[str], trees: dict[str, ast.Module]) -> list[tuple]:
    """Candidate api_recall targets of one file: [(line number, callee, defining file, definition line number)].

    A candidate line is a one-line simple statement whose first call (in source order) of a callee `f` or
    `mod.f` satisfies: `f` is a top-level function or class of *another* file of the repo, imported here with
    `from .x import f` or reached as `mod.f` after `from . import mod`; the call passes >= API_MIN_ARGS
    arguments; and it is the file's first call of that callee (so the in-file prefix cannot be copied: the
    signature has to be recalled from the cross-file context)."""
    tree = trees[path]
    imports = _intra_repo_imports(tree, path, repo_paths)
    modules = _module_imports(tree, path, repo_paths)
    lines = text.split("\n")

    def resolve(func):
        if isinstance(func, ast.Name) and func.id in imports:
            file, name = imports[func.id], func.id
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in modules:
            file, name = modules[func.value.id], func.attr
        else:
            return None
        definition = _top_level_callables(trees[file]).get(_original_name(tree, func, name))
        return (file, definition) if definition is not None else None

    first_call, calls = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            resolved = resolve(node.func)
            if resolved:
                callee = ast.unparse(node.func)
                first_call[callee] = min(first_call.get(callee, (1 << 30, 0)), (node.lineno, node.col_offset))
                calls.append((node.lineno, node.col_offset, callee, len(node.args) + len(node.keywords), resolved))
    statements = _statement_lines(tree)
    out = []
    for lineno, col, callee, n_args, (file, definition) in sorted(calls, key=lambda c: c[:3]):
        if (lineno, col) != first_call[callee] or lineno not in statements or lineno < 2 or n_args < API_MIN_ARGS:
            continue
        if len("".join(lines[lineno - 1].split())) < MIN_TARGET_CHARS:
            continue
        if first_call_in_line(lines[lineno - 1], callee) != (callee, n_args):
            continue  # another call of the same callee comes first on the line (e.g. nested): ambiguous target
        out.append((lineno, callee, file, definition.lineno))
    return out


def _original_name(tree: ast.Module, func: ast.AST, name: str) -> str:
    """The defining file's name for a callee: `from .x import f as g` -> calls of g define f."""
    if isinstance(func, ast.Name):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return alias.name
    return name


def first_call_in_line(line: str, callee: str | None = None) -> tuple[str, int] | None:
    """(callee, argument count) of the first call in a code line (source order), or of the first call of
    `callee` when given; None if the line does not parse (after dedent) or has no such call. The argument
    count is positional + keyword arguments as written (`*a` and `**k` count one each)."""
    try:
        tree = ast.parse(line.strip())
    except SyntaxError:
        return None
    calls = sorted((n.lineno, n.col_offset, ast.unparse(n.func), len(n.args) + len(n.keywords))
                   for n in ast.walk(tree) if isinstance(n, ast.Call))
    for _, _, name, n_args in calls:
        if callee is None or name == callee:
            return name, n_args
    return None


def build_api_recall(sources: dict[str, str]) -> list[dict]:
    """API-call recall (RepoQA-lite, docs/evaluation.md#api-recall): the target line is the file's first call of a
    function or class defined in *another* repo file, with >= 2 arguments; the defining file is in the
    context, placed last before the target file so cropping keeps it (it is still a whole file plus the
    target prefix away from the call). The prompt is built exactly as for repo_nextline and ends at the end
    of the line before the target. Scored by `scoring.api_match` (callee and argument count of the predicted
    line's call equal the target's), `scoring.api_name_match` (the callee is called), EM and edit similarity.
    Record fields: `query` = the callee as written (`f` or `mod.f`), `needle` = the definition's first line,
    `category` = "function" or "class"."""
    records = []
    for repo in REPOS:
        paths = repo_files(sources, repo)
        path_set = set(paths)
        trees = {p: ast.parse(sources[p]) for p in paths}
        per_bucket: dict[str, list] = {b: [] for b in BUCKETS}
        for path in paths:
            near = sorted(set(_intra_repo_imports(trees[path], path, path_set).values())
                          | set(_module_imports(trees[path], path, path_set).values()))
            prefix = prefix_lengths(sources[path])
            for lineno, callee, file, def_line in api_calls(sources[path], path, path_set, trees):
                far = [p for p in paths if p != path and p not in near]
                context = far + [p for p in near if p != file] + [file]
                total = sum(len(sources[p]) for p in context) + prefix[lineno]
                # cropping may cut the defining file above its definition, never below
                keep = len(sources[file]) - prefix_lengths(sources[file])[def_line] + prefix[lineno]
                for bucket, tokens in BUCKETS.items():
                    if (total >= tokens * CHARS_PER_TOKEN
                            and keep <= (tokens - API_MAX_NEW_TOKENS) * API_KEEP_CHARS_PER_TOKEN):
                        per_bucket[bucket].append((_key("api", path, lineno), path, lineno, callee, file, def_line,
                                                   context))
        for bucket, candidates in per_bucket.items():
            for _, path, lineno, callee, file, def_line, context in sorted(candidates)[:API_PER_REPO_BUCKET]:
                target = sources[path].split("\n")[lineno - 1]
                definition = sources[file].split("\n")[def_line - 1].strip()
                category = "class" if definition.startswith("class ") else "function"
                records.append(_record("api_recall", bucket, f"{path}:{lineno}", category=category, repo=repo,
                                       context_files=context, target_file=path, target_line=lineno,
                                       target=target, needle=definition, query=callee, answers=[target]))
    return records


def perplexity_span_start(text: str) -> int:
    """First line (1-based) of the scored span of a file: the largest line number L such that the text after
    the in-file prompt of L (`prefix_lengths(text)[L]` chars, ending at the end of a non-blank line) has
    >= PPL_CHARS chars. The span therefore starts with a newline and runs to the end of the file."""
    prefix = prefix_lengths(text)
    eligible = [n for n in range(2, len(prefix)) if len(text) - prefix[n] >= PPL_CHARS and prefix[n] > 0]
    if not eligible:
        raise ValueError(f"file of {len(text)} chars is too short for a {PPL_CHARS}-char scored span")
    return max(eligible)


def build_code_perplexity(sources: dict[str, str]) -> list[dict]:
    """Long-context perplexity (docs/evaluation.md#code-perplexity): the NLL of a fixed span (the file's last
    ~PPL_CHARS chars, line-aligned, `target`) given the preceding context cropped to each bucket. The same span is
    scored at every bucket its context fills, so the bucket curve isolates the effect of context length.
    category "repo": cross-file context (as repo_nextline) + the target file's prefix; PPL_FILES_PER_REPO
    hash-chosen files of at least 4 * PPL_CHARS chars per repo. category "file": the LONG_FILES alone."""
    records = []

    def add(category, repo, path, context):
        text = sources[path]
        lineno = perplexity_span_start(text)
        span = text[prefix_lengths(text)[lineno]:]
        chars = sum(len(sources[p]) for p in context) + len(text)
        for bucket in _buckets_for(chars):
            records.append(_record("code_perplexity", bucket, f"{category}/{path}", category=category, repo=repo,
                                   context_files=context, target_file=path, target_line=lineno, target=span))

    for repo in REPOS:
        paths = repo_files(sources, repo)
        path_set = set(paths)
        chosen = sorted((_key("ppl", p), p) for p in paths if len(sources[p]) >= 4 * PPL_CHARS)[:PPL_FILES_PER_REPO]
        for _, path in sorted(chosen, key=lambda c: c[1]):
            near = sorted(set(_intra_repo_imports(ast.parse(sources[path]), path, path_set).values()))
            add("repo", repo, path, [p for p in paths if p != path and p not in near] + near)
    for path in LONG_FILES:
        add("file", path, path, [])
    return records


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def build(out_dir: str | os.PathLike = DATA_DIR) -> dict:
    """Write sources.jsonl, tasks.jsonl and manifest.json into `out_dir`; return the manifest."""
    sources = stdlib_sources()
    records = (build_repo_nextline(sources) + build_file_nextline(sources) + build_code_needle(sources)
               + build_api_recall(sources) + build_code_perplexity(sources))
    # hash order within each (task, bucket), so the first N records (`--limit N`) are a fair sample; for
    # code_perplexity the hash ignores the bucket, so `--limit N` scores the same spans in every bucket they fill
    records.sort(key=lambda r: (TASK_ORDER.index(r["task"]), r["bucket"],
                                _key(r["id"]) if r["task"] != "code_perplexity"
                                else _key(r["task"], r["category"], r["target_file"])))
    used = sorted({p for r in records for p in r["context_files"] + [r["target_file"]] if p})
    blobs = {"sources.jsonl": _jsonl({"path": p, "sha256": hashlib.sha256(sources[p].encode()).hexdigest(),
                                      "text": sources[p]} for p in used),
             "tasks.jsonl": _jsonl(records)}
    task_sha256 = {task: hashlib.sha256(_jsonl(r for r in records if r["task"] == task)).hexdigest()
                   for task in TASK_ORDER}
    counts = Counter((r["task"], r["bucket"]) for r in records)
    manifest = {
        "builder_version": BUILDER_VERSION, "seed": SEED,
        "origin": (f"CPython {platform.python_version()} standard library (PSF License), "
                   f"{sysconfig.get_paths()['stdlib']}"),
        "python_version": platform.python_version(),
        "buckets": BUCKETS, "chars_per_token": CHARS_PER_TOKEN,
        "counts": {task: {str(b): n for (t, b), n in sorted(counts.items()) if t == task}
                   for task in sorted({t for t, _ in counts})},
        "files": {name: hashlib.sha256(blob).hexdigest() for name, blob in blobs.items()},
        "task_sha256": task_sha256,
        "sources": {p: hashlib.sha256(sources[p].encode()).hexdigest() for p in used},
    }
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        (out / name).write_bytes(blob)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return manifest
