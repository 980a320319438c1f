"""Run identity of `seekv4 eval`: content fingerprints of the evaluated model and of the benchmark records.

A resumed run may only reuse samples that the same model generated from the same records, so saved samples
are matched by content, never by the `--model` string: the same folder spelled differently resumes, a folder
whose weights were replaced does not.

- model folder: sha256 of `config.json` and `generation_config.json` (parsed, without `transformers_version`,
  which every re-save rewrites), of the weight files (safetensors / PyTorch shards and their indexes) and of the
  tokenizer files, each file digested with its name;
- GGUF file: its sha256 (config, weights and tokenizer all live in it);
- preset (random weights): the preset name, the initialisation seed and the sha256 of the preset's config.

Weights are hashed by streaming every byte. Their digests are cached in the run folder, keyed by (absolute path,
size, mtime_ns), so resuming a run of a large model does not re-read it; the cache only saves time, the
fingerprint is the content digest.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pathlib

from .models import PRESET_SEED, model_kind
from .prompts import EvalError
from .report import write_atomic

CACHE_FILE = "sha256_cache.json"
CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt", "*.model",
                   "*.tiktoken", "chat_template*")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 of large files by (absolute path, size, mtime_ns), stored as JSON in a run folder."""

    def __init__(self, folder: pathlib.Path):
        self.path, self.changed = folder / CACHE_FILE, False
        try:
            self.entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):   # absent or damaged: a cache is rebuilt, never trusted blindly
            self.entries = {}

    def sha256(self, path) -> str:
        key, stat = os.path.realpath(path), os.stat(path)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"]
        digest = file_sha256(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Write the cache (atomically) if it changed and the run folder exists."""
        if not self.changed or not self.path.parent.is_dir():
            return
        text = json.dumps(self.entries, indent=1, sort_keys=True) + "\n"
        write_atomic(self.path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        self.changed = False


def _canonical_config(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k != "transformers_version"}, sort_keys=True)


def _digest_files(folder: pathlib.Path, names: list[str], sha256) -> str:
    """One digest over (name, sha256 of the bytes) of each file."""
    return hashlib.sha256("".join(f"{name}\0{sha256(folder / name)}\n" for name in names).encode()).hexdigest()


def _matching(names: list[str], patterns) -> list[str]:
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def model_fingerprint(ref: str, cache: DigestCache) -> dict:
    """The content identity of `--model ref` (see the module docstring); raises EvalError as load_model does."""
    kind = model_kind(ref)
    if kind == "gguf":
        return {"kind": "gguf", "sha256": cache.sha256(ref)}
    if kind == "preset":
        from .. import SeekV4Config

        config = _canonical_config(SeekV4Config.from_preset(ref).to_dict())
        return {"kind": "preset", "preset": ref, "seed": PRESET_SEED,
                "config": hashlib.sha256(config.encode()).hexdigest()}
    folder = pathlib.Path(ref)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = _matching(names, WEIGHT_FILES)
    if not weights:
        raise EvalError(f"{ref} has no weight files ({', '.join(WEIGHT_FILES)}); save the model with "
                        "save_pretrained(folder).")
    config = hashlib.sha256("".join(
        f"{name}\0{_canonical_config(json.loads((folder / name).read_text(encoding='utf-8')))}\n"
        for name in CONFIG_FILES if name in names).encode()).hexdigest()
    tokenizer = _matching(names, TOKENIZER_FILES)
    return {"kind": "folder", "config": config, "weights": _digest_files(folder, weights, cache.sha256),
            # None: no tokenizer files, so seekv4's byte tokenizer stands in (determined by the config)
            "tokenizer": _digest_files(folder, tokenizer, file_sha256) if tokenizer else None}


def task_fingerprints(data_dir: pathlib.Path) -> tuple[dict[str, str], str]:
    """({task: sha256 of its records' lines in tasks.jsonl}, sha256 of sources.jsonl), computed from the files
    (for the shipped data they equal the manifest's `task_sha256` and `files["sources.jsonl"]`)."""
    per_task: dict = {}
    with open(data_dir / "tasks.jsonl", "rb") as f:
        for line in f:
            per_task.setdefault(json.loads(line)["task"], hashlib.sha256()).update(line)
    return {task: digest.hexdigest() for task, digest in per_task.items()}, file_sha256(data_dir / "sources.jsonl")
