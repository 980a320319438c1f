"""Atomic `save_pretrained`, and a load-time check that a checkpoint's files are whole and come from one save.

transformers writes a checkpoint file by file into the target folder: a save that fails half-way leaves new shards
next to old ones (which load without complaint and compute something else), and a single-file save over a sharded
one, or the reverse, leaves the other layout's stale files behind (a stale `model.safetensors` is even preferred
to a new index). Here transformers writes into a private staging folder instead; each weights file is stamped
with a fresh save id (safetensors metadata `seekv4_save_id`, also written into the index's metadata and, for the
default variant, into config.json: every variant of a folder shares it), and only the complete, flushed
checkpoint is moved into place:

  * a new target: the staging folder `.{name}.tmp-<id>` next to it is renamed to it (one atomic rename);
  * an existing target: only checkpoint files are swapped, never the folder. It may hold files this save does
    not write (a tokenizer, a README, training state, Engram table files, another tool's files), and swapping the
    folder would have to move them, racing with anyone writing there and hiding them if interrupted. The staging
    folder lives inside the target (same filesystem, so every move is a rename). The previous checkpoint's files
    (those this save writes, plus every weights file of the same variant: a stale layout, shards of an older
    save with more shards) are moved into a backup folder `.{name}.old-<id>`, then the new files are moved in
    (config.json first out, last in), then the backup is deleted. If a move fails, the moves are undone: the
    target is as it was. A crash during the swap leaves the folder without config.json (a load error that names
    the backup folder holding the previous checkpoint), never a silent mix.

Costs: room for both checkpoints until the swap, and one sequential copy of each shard (its new header is longer).
Old files are renamed away, never rewritten in place: whoever still reads them (a memory map) keeps the old bytes.

`check_checkpoint` runs before transformers reads a local checkpoint: every weights file it will read must be
complete (a torn file names itself), and in strict mode the save ids that config.json, the index and the shards
carry must agree. Files without an id (written by plain transformers, by `config.save_pretrained`, by hand with
safetensors) are not compared, so checkpoints of other tools and deliberate edits load as before.
"""
from __future__ import annotations

import glob
import inspect
import json
import os
import re
import shutil
import uuid
from collections import Counter

from transformers import PreTrainedModel
from transformers.modeling_utils import _add_variant
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils.hub import create_and_tag_model_card, hf_api

from .fileio import fsync_path

SAVE_ID_KEY = "seekv4_save_id"
CONFIG_NAME = "config.json"
_COPY_CHUNK = 1 << 24  # bytes per read when a shard's data is copied behind its new header
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def _weights_names(variant: str | None) -> tuple[str, str, re.Pattern]:
    """The single weights file, the index, and the shard pattern of a variant."""
    single = _add_variant(SAFE_WEIGHTS_NAME, variant)
    shard = re.compile(re.escape(single[: -len(".safetensors")]) + r"-\d{5}-of-\d{5}\.safetensors")
    return single, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant), shard


# ---- safetensors headers ---------------------------------------------------------------------------------------
def read_header(path: str) -> tuple[int, dict]:
    """(header length, header) of a safetensors file; ValueError naming the file when it is not whole."""

    def torn(why: str) -> ValueError:
        return ValueError(f"Checkpoint file {path} is incomplete or corrupt ({why}); it was probably truncated by an "
                          "interrupted save or copy. Save the model into its folder again (save_pretrained) or copy "
                          "the file again from its source.")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise torn(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise torn(f"the header claims {length} bytes of {size - 8}")
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise torn(f"unreadable header: {err}") from None
    if 8 + length + end != size:
        raise torn(f"the header describes {8 + length + end} bytes, the file holds {size}")
    return length, header


def stamp_weights(path: str, save_id: str):
    """Add the save id to a safetensors file's metadata: a new header, then the data bytes copied unchanged.
    (transformers' `save_pretrained` writes a fixed metadata dict; this is one sequential copy per file.)"""
    length, header = read_header(path)
    header["__metadata__"] = {**header.get("__metadata__", {}), SAVE_ID_KEY: save_id}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    stamped = path + ".stamped"
    with open(path, "rb") as src, open(stamped, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little") + raw)
        src.seek(8 + length)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(stamped, path)


def _stamp_json(path: str, save_id: str, in_metadata: bool):
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    (content.setdefault("metadata", {}) if in_metadata else content)[SAVE_ID_KEY] = save_id
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(content, indent=2, sort_keys=True) + "\n")  # transformers' formatting
        f.flush()
        os.fsync(f.fileno())


def _stamp(folder: str, save_id: str, variant: str | None):
    """Stamp the weights files, the index and (default variant only) config.json; flush everything."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            stamp_weights(path, save_id)
        elif re.fullmatch(r".+\.safetensors\.index(\..+)?\.json", name):
            _stamp_json(path, save_id, in_metadata=True)
        elif name == CONFIG_NAME and not variant:  # shared by every variant of a folder: not theirs to claim
            _stamp_json(path, save_id, in_metadata=False)
        elif os.path.isfile(path):
            fsync_path(path)
    fsync_path(folder)


# ---- saving ----------------------------------------------------------------------------------------------------
def _swap_in(staging: str, target: str, variant: str | None, save_id: str):
    """Move the staged files into an existing `target`, the previous checkpoint files out (see the module doc)."""
    new = sorted(os.listdir(staging), key=lambda name: name == CONFIG_NAME)  # config.json last: the entry point
    single, index, shard = _weights_names(variant)
    old = [name for name in os.listdir(target)
           if name in new or name in (single, index) or shard.fullmatch(name)]
    old.sort(key=lambda name: name != CONFIG_NAME)  # config.json first out
    backup = os.path.join(target, f".{os.path.basename(target)}.old-{save_id}")
    os.mkdir(backup)
    moved_out, moved_in = [], []
    try:
        for name in old:
            os.rename(os.path.join(target, name), os.path.join(backup, name))
            moved_out.append(name)
        for name in new:
            os.rename(os.path.join(staging, name), os.path.join(target, name))
            moved_in.append(name)
        fsync_path(target)
    except BaseException:
        for name in reversed(moved_in):
            os.rename(os.path.join(target, name), os.path.join(staging, name))
        for name in reversed(moved_out):
            os.rename(os.path.join(backup, name), os.path.join(target, name))
        os.rmdir(backup)
        raise
    shutil.rmtree(backup)


def save_atomically(model: PreTrainedModel, save_directory, variant: str | None = None, **kwargs):
    """`PreTrainedModel.save_pretrained(model, save_directory, variant=variant, **kwargs)` (hub upload excluded),
    written into a staging folder, stamped with a new save id and moved into place (see the module doc)."""
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(target):
        raise ValueError(f"save_pretrained needs a folder, but {target} is a file; pass a folder path.")
    save_id = uuid.uuid4().hex
    exists = os.path.isdir(target)
    parent, name = os.path.split(target)
    staging = os.path.join(target if exists else parent, f".{name}.tmp-{save_id}")
    os.makedirs(staging)
    try:
        PreTrainedModel.save_pretrained(model, staging, variant=variant, **kwargs)
        _stamp(staging, save_id, variant)
        if exists:
            _swap_in(staging, target, variant, save_id)
        else:
            os.rename(staging, target)
            fsync_path(parent)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


_SAVE_PARAMETERS = set(inspect.signature(PreTrainedModel.save_pretrained).parameters) - {"self", "kwargs"}


def save_checkpoint(model: PreTrainedModel, save_directory, push_to_hub: bool = False, **kwargs):
    """`save_atomically`, then (push_to_hub=True) the upload of the changed files as transformers does it."""
    if kwargs.pop("safe_serialization", True) is False:
        raise ValueError("safe_serialization=False is not supported: transformers 5 writes safetensors only; "
                         "leave it out (or pass True).")
    if kwargs.get("distributed_checkpoint") or not model.should_save_on_this_rank(kwargs.get("is_main_process", True)):
        # every rank writes its part (DCP), or this rank writes nothing: transformers' save, unchanged
        return PreTrainedModel.save_pretrained(model, save_directory, push_to_hub=push_to_hub, **kwargs)
    if not push_to_hub:
        return save_atomically(model, save_directory, **kwargs)
    save_kwargs = {k: v for k, v in kwargs.items() if k in _SAVE_PARAMETERS}
    hub_kwargs = {k: v for k, v in kwargs.items() if k not in _SAVE_PARAMETERS}
    token = kwargs.get("token")
    if token is not None:
        hub_kwargs["token"] = token
    commit_message, create_pr = hub_kwargs.pop("commit_message", None), hub_kwargs.pop("create_pr", False)
    folder = os.fspath(save_directory)
    repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(folder)))
    repo_id = hf_api().create_repo(repo_id, exist_ok=True, **hub_kwargs).repo_id
    files_timestamps = model._get_files_timestamps(folder) if os.path.isdir(folder) else {}
    save_atomically(model, folder, **save_kwargs)
    create_and_tag_model_card(repo_id, model.model_tags, token=token).save(os.path.join(folder, "README.md"))
    model._upload_modified_files(folder, repo_id, files_timestamps, commit_message=commit_message, token=token,
                                 create_pr=create_pr)


# ---- loading ---------------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except ValueError as err:
        raise ValueError(f"Checkpoint file {path} is not valid JSON ({err}); it was probably truncated by an "
                         "interrupted save or copy. Save the model into its folder again (save_pretrained) or copy "
                         "the file again from its source.") from None
    if not isinstance(content, dict):
        raise ValueError(f"Checkpoint file {path} holds a JSON {type(content).__name__}, not an object; restore it.")
    return content


def _json_save_id(path: str) -> str | None:
    """The save id of config.json (top level) or of an index (in its metadata)."""
    content = _read_json(path)
    return (content.get("metadata", {}) if "weight_map" in content else content).get(SAVE_ID_KEY)


def check_checkpoint(path, strict: bool = True, subfolder: str = "", variant: str | None = None, gguf_file=None,
                     use_safetensors: bool | None = None, **_):
    """Before transformers loads a local checkpoint: its weights files are whole and (strict) from one save.
    Takes `from_pretrained`'s arguments."""
    if path is None or gguf_file is not None or use_safetensors is False:
        return
    folder = os.path.join(os.fspath(path), subfolder)
    if not os.path.isdir(folder):
        return  # a Hub id (its files are checked by hash on download) or a single file
    single, index, _ = _weights_names(variant)
    name = os.path.basename(os.path.abspath(folder))
    backups = sorted(glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.old-*")))
    if backups and not os.path.isfile(os.path.join(folder, CONFIG_NAME)):  # config.json: first out, last in
        raise ValueError(f"Checkpoint {folder} is incomplete: a save was interrupted while it swapped files. The "
                         f"previous checkpoint's files are in {backups[-1]}: move them back into the folder, or save "
                         "the model into it again.")
    if os.path.isfile(os.path.join(folder, single)):  # transformers' preference
        reference, files = single, [single]
    elif os.path.isfile(os.path.join(folder, index)):
        files = sorted(set(_read_json(os.path.join(folder, index)).get("weight_map", {}).values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise ValueError(f"Checkpoint {folder} is incomplete: {index} lists shards that are missing: {missing}. "
                             "Save the model into the folder again (save_pretrained) or copy the missing files.")
        reference = index
    else:
        return  # transformers reports the missing weights
    headers = {name: read_header(os.path.join(folder, name))[1] for name in files}  # raises on a torn file
    if not strict:
        return
    ids = {name: header.get("__metadata__", {}).get(SAVE_ID_KEY) for name, header in headers.items()}
    # the single-file checkpoint's id is its header's; config.json is shared by every variant of the folder
    for name in [n for n in (reference, None if variant else CONFIG_NAME) if n not in (None, single)]:
        if os.path.isfile(os.path.join(folder, name)):
            ids[name] = _json_save_id(os.path.join(folder, name))
    ids = {name: save_id for name, save_id in ids.items() if save_id is not None}  # others: by hand / other tools
    if len(set(ids.values())) > 1:
        expected = ids.get(reference) or Counter(ids.values()).most_common(1)[0][0]
        strays = sorted(name for name, save_id in ids.items() if save_id != expected)
        raise ValueError(
            f"Checkpoint {folder} mixes files of different saves: {strays[:8]}{' ...' if len(strays) > 8 else ''} "
            f"were written by another save than {reference if reference in ids else 'the other files'} (save id "
            f"{expected}). An interrupted or concurrent save, or a copy, left the folder inconsistent: save the model "
            "into it again (model.save_pretrained(folder)) or restore the checkpoint from a complete copy."
        )
