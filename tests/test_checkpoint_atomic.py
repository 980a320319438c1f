"""`save_pretrained` is atomic and the loader rejects checkpoints whose files come from different saves."""
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers.modeling_utils as modeling_utils
from safetensors import safe_open

from seekv4 import SeekV4Config, SeekV4ForCausalLM

SHARDED = "200KB"  # tiny-gqa (~0.7 MB of weights) -> 4 shards
MORE_SHARDS = "60KB"  # -> 15 shards


def make(seed: int) -> SeekV4ForCausalLM:
    torch.manual_seed(seed)
    return SeekV4ForCausalLM(SeekV4Config.from_preset("tiny-gqa")).eval()


def logits(model, ids=None):
    ids = torch.arange(3, 15)[None] if ids is None else ids
    with torch.no_grad():
        return model(ids).logits


def shards(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))


def leftovers(folder) -> list[str]:
    """Staging/backup folders of a save, next to the folder or inside it."""
    names = [p.name for p in folder.iterdir()] + [p.name for p in folder.parent.iterdir()]
    return sorted(n for n in names if ".tmp-" in n or ".old-" in n)


@pytest.fixture
def disk_full(monkeypatch):
    """`disk_full()` makes later saves raise while writing their second shard (a full disk, a killed writer) and
    returns the shard paths they try to write; `monkeypatch.undo()` repairs the disk."""
    original, calls = modeling_utils.safe_save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(tensors, filename, metadata=metadata)

    def arm():
        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
        return calls

    return arm


@pytest.mark.parametrize("old_shard_size, new_shard_size", [(SHARDED, SHARDED), ("50GB", SHARDED)])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, disk_full, old_shard_size, new_shard_size):
    target = tmp_path / "ckpt"
    old = make(0)
    old.save_pretrained(target, max_shard_size=old_shard_size)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = disk_full()
    with pytest.raises(OSError, match="No space left"):
        make(1).save_pretrained(target, max_shard_size=new_shard_size)
    assert len(calls) == 2  # the first shard of the new save was written before the failure
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(target) == []
    torch.testing.assert_close(logits(SeekV4ForCausalLM.from_pretrained(target).eval()), logits(old))


def test_failed_first_save_leaves_nothing(tmp_path, disk_full):
    disk_full()
    target = tmp_path / "ckpt"
    with pytest.raises(OSError, match="No space left"):
        make(0).save_pretrained(target, max_shard_size=SHARDED)
    assert list(tmp_path.iterdir()) == []


def test_shards_of_two_saves_are_rejected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make(0).save_pretrained(a, max_shard_size=SHARDED)
    make(1).save_pretrained(b, max_shard_size=SHARDED)
    stray = shards(a)[1]
    shutil.copyfile(b / stray, a / stray)  # same names, same tensors, other weights: only the save ids differ
    with pytest.raises(ValueError, match=rf"(?s)mixes files of different saves.*{stray}.*save_pretrained"):
        SeekV4ForCausalLM.from_pretrained(a)
    assert shards(a) == shards(b)  # nothing was touched


def test_config_of_another_save_is_rejected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make(0).save_pretrained(a)
    make(1).save_pretrained(b)
    shutil.copyfile(b / "config.json", a / "config.json")
    with pytest.raises(ValueError, match=r"(?s)mixes files of different saves.*config\.json"):
        SeekV4ForCausalLM.from_pretrained(a)


def test_config_written_by_hand_is_accepted(tmp_path):
    model = make(0)
    model.save_pretrained(tmp_path)
    model.config.save_pretrained(tmp_path)  # e.g. a user edits a field: no save id, not checked against the weights
    torch.testing.assert_close(logits(SeekV4ForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


@pytest.mark.parametrize("old_shard_size, new_shard_size", [
    (MORE_SHARDS, SHARDED),  # 15 shards, then 4
    ("50GB", SHARDED),  # one file, then shards: transformers prefers a stale model.safetensors over the index
    (SHARDED, "50GB"),  # shards, then one file
])
def test_resave_leaves_only_new_checkpoint_files(tmp_path, old_shard_size, new_shard_size):
    make(0).save_pretrained(tmp_path, max_shard_size=old_shard_size)
    new = make(1)
    new.save_pretrained(tmp_path, max_shard_size=new_shard_size)
    torch.testing.assert_close(logits(SeekV4ForCausalLM.from_pretrained(tmp_path).eval()), logits(new))
    fresh = tmp_path.parent / f"{tmp_path.name}-fresh"
    new.save_pretrained(fresh, max_shard_size=new_shard_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in fresh.iterdir())
    index = tmp_path / "model.safetensors.index.json"
    if index.exists():
        assert sorted(set(json.loads(index.read_text())["weight_map"].values())) == shards(tmp_path)


def test_resave_keeps_files_it_did_not_write(tmp_path, monkeypatch, disk_full):
    make(0).save_pretrained(tmp_path, max_shard_size=SHARDED)
    kept = {"tokenizer.json": b'{"model": {}}', "notes.txt": b"run 7, lr 3e-4",
            "engram_tables/layer_1.bin": b"\0" * 64,
            "model-00001-of-00002.bin": b"a file of another format, never read next to safetensors"}
    for name, data in kept.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    disk_full()
    with pytest.raises(OSError, match="No space left"):  # a failed save ...
        make(1).save_pretrained(tmp_path, max_shard_size=SHARDED)
    monkeypatch.undo()
    make(2).save_pretrained(tmp_path, max_shard_size=MORE_SHARDS)  # ... and a successful one
    for name, data in kept.items():
        assert (tmp_path / name).read_bytes() == data, name


def test_torn_shard_names_the_file(tmp_path):
    make(0).save_pretrained(tmp_path, max_shard_size=SHARDED)
    torn = tmp_path / shards(tmp_path)[2]
    with open(torn, "r+b") as f:
        f.truncate(os.path.getsize(torn) - 100)
    with pytest.raises(ValueError, match=rf"(?s){torn.name}.*(incomplete|truncated)"):
        SeekV4ForCausalLM.from_pretrained(tmp_path)


def test_torn_index_names_the_file(tmp_path):
    make(0).save_pretrained(tmp_path, max_shard_size=SHARDED)
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors\.index\.json is not valid JSON.*truncated"):
        SeekV4ForCausalLM.from_pretrained(tmp_path)


def test_every_file_carries_the_save_id(tmp_path):
    make(0).save_pretrained(tmp_path, max_shard_size=SHARDED)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    save_id = index["metadata"]["seekv4_save_id"]
    assert json.loads((tmp_path / "config.json").read_text())["seekv4_save_id"] == save_id
    for name in shards(tmp_path):
        with safe_open(tmp_path / name, "pt") as f:
            assert f.metadata() == {"format": "pt", "seekv4_save_id": save_id}
    # the id belongs to the files, not to the config object
    assert not hasattr(SeekV4ForCausalLM.from_pretrained(tmp_path).config, "seekv4_save_id")


@pytest.fixture
def fake_hub(monkeypatch):
    """Records what would be uploaded; nothing leaves the machine."""
    import huggingface_hub
    import transformers.utils.hub as hub

    from seekv4.modeling import checkpoint

    uploads = []

    class Api:
        def create_repo(self, repo_id, exist_ok=False, **kwargs):
            uploads.append(("create_repo", repo_id, kwargs))
            return SimpleNamespace(repo_id=f"someone/{repo_id}")

        def create_commit(self, repo_id, operations, **kwargs):
            files = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
            uploads.append(("create_commit", repo_id, files))

    def card(repo_id, tags=None, token=None):
        return huggingface_hub.ModelCard(f"---\nlibrary_name: transformers\n---\n# {repo_id}\n")

    for module in (hub, checkpoint):
        monkeypatch.setattr(module, "hf_api", Api)
        monkeypatch.setattr(module, "create_and_tag_model_card", card)
    return uploads


def test_save_with_push_to_hub_uploads_the_new_checkpoint(tmp_path, fake_hub):
    target = tmp_path / "my-model"
    make(0).save_pretrained(target, max_shard_size=MORE_SHARDS)
    (target / "notes.txt").write_text("not uploaded: unchanged by this save")
    new = make(1)
    new.save_pretrained(target, push_to_hub=True, max_shard_size=SHARDED, private=True, commit_message="v2")
    (_, repo, create_kwargs), (_, committed_repo, files) = fake_hub
    assert (repo, committed_repo, create_kwargs) == ("my-model", "someone/my-model", {"private": True})
    assert sorted(files) == sorted(p.name for p in target.iterdir() if p.name != "notes.txt")
    assert "README.md" in files and "model-00004-of-00004.safetensors" in files
    assert all(files[name] == (target / name).read_bytes() for name in files)
    torch.testing.assert_close(logits(SeekV4ForCausalLM.from_pretrained(target).eval()), logits(new))


def test_push_to_hub_saves_through_the_atomic_save(fake_hub):
    make(0).push_to_hub("my-model", max_shard_size=SHARDED)
    (_, _, files), = [u for u in fake_hub if u[0] == "create_commit"]
    index = json.loads(files["model.safetensors.index.json"])
    assert json.loads(files["config.json"])["seekv4_save_id"] == index["metadata"]["seekv4_save_id"]
    assert sorted(set(index["weight_map"].values())) == sorted(n for n in files if n.endswith(".safetensors"))


def test_safe_serialization_is_accepted_and_false_is_refused(tmp_path):
    model = make(0)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size=SHARDED)
    assert len(shards(tmp_path)) == 4
    with pytest.raises(ValueError, match="safe_serialization=False"):
        model.save_pretrained(tmp_path, safe_serialization=False)


def test_crash_at_any_step_of_the_swap_is_never_a_silent_mix(tmp_path, monkeypatch):
    """A crash (no rollback) after each file move: the folder loads the old or the new model, or fails loudly."""
    old, new = make(0), make(1)
    expected = {"old": logits(old), "new": logits(new)}
    rename, step = os.rename, 0
    while True:
        target = tmp_path / f"ckpt{step}"
        old.save_pretrained(target, max_shard_size=SHARDED)
        calls = []

        def crash_after(src, dst, _step=step):
            if len(calls) == _step:
                raise SystemExit("power loss")  # every later move fails too: the rollback never happens
            calls.append(src)
            return rename(src, dst)

        monkeypatch.setattr(os, "rename", crash_after)
        try:
            new.save_pretrained(target, max_shard_size=SHARDED)
            finished = True
        except SystemExit:
            finished = False
        monkeypatch.undo()
        try:
            got = logits(SeekV4ForCausalLM.from_pretrained(target).eval())
        except ValueError as err:
            assert "interrupted" in str(err) and ".old-" in str(err)
        else:
            assert any(torch.allclose(got, ref, atol=1e-5, rtol=1e-5) for ref in expected.values()), step
        if finished:
            break
        step += 1
    assert step == 14  # every move (7 old files out, 7 new files in) was a crash point


def test_variant_resave_touches_only_its_variant(tmp_path):
    make(0).save_pretrained(tmp_path)
    plain = (tmp_path / "model.safetensors").read_bytes()
    make(1).save_pretrained(tmp_path, variant="v2", max_shard_size=SHARDED)
    new = make(2)
    new.save_pretrained(tmp_path, variant="v2")  # one file: its v2 shards and index go, model.safetensors stays
    assert shards(tmp_path) == ["model.safetensors", "model.v2.safetensors"]
    assert not (tmp_path / "model.safetensors.index.v2.json").exists()
    assert (tmp_path / "model.safetensors").read_bytes() == plain
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path, variant="v2").eval()
    torch.testing.assert_close(logits(loaded), logits(new))
    SeekV4ForCausalLM.from_pretrained(tmp_path)  # config.json (shared, rewritten by the v2 saves) is not compared
