"""Disk Engram tables: a call never writes a table it did not create; flushes are crash-safe (journal);
a torn table is refused on open; training + flush + save + reload round-trips bit-exactly."""
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling import engram_table
from seekv4.modeling.engram_table import EngramTable, open_table_file
from seekv4.training import EngramTableCallback

ENGRAM = dict(engram_layer_ids=[1, 2], engram_vocab_size=[10, 20], engram_n_heads=2, engram_head_dim=8)
TABLE_KEY = "model.layers.1.engram.table.weight"


def make(table_dir, seed=0):
    torch.manual_seed(seed)
    config = SeekV4Config.from_preset("tiny", **ENGRAM, residual_kind="mhc", engram_storage="disk",
                                      engram_table_dir=str(table_dir))
    return SeekV4ForCausalLM(config)


def ids(seed=1):
    return torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(seed))


def train_step(model, seed=1, lr=0.5):
    """One step as the Trainer + EngramTableCallback run it (the tables only: no dense optimizer needed)."""
    model.train()
    x = ids(seed)
    model(x, labels=x).loss.backward()
    EngramTableCallback().on_step_end(SimpleNamespace(learning_rate=lr), None, None, model=model)
    model.zero_grad(set_to_none=True)


def digest(folder) -> dict[str, str]:
    """sha256 of every file under `folder` (names included: a new or vanished file shows too)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def table_of(model, layer=1) -> EngramTable:
    return model.model.layers[layer].engram.table


def test_building_over_an_existing_table_dir_refuses_and_keeps_its_bytes(tmp_path):
    live = tmp_path / "live"
    model = make(live)
    train_step(model)
    table_of(model).flush()
    before = digest(live)
    assert before  # the table files exist
    with pytest.raises(ValueError, match=r"(?s)live already holds.*new or empty engram_table_dir.*from_pretrained"):
        make(live, seed=1)  # another seed: a re-initialisation would change the bytes
    assert digest(live) == before
    # an existing but empty folder (e.g. from tempfile.mkdtemp) holds nothing to overwrite: allowed
    (tmp_path / "empty").mkdir()
    assert table_of(make(tmp_path / "empty")).path == str(tmp_path / "empty" / "engram_layer1.bin")


def test_from_pretrained_never_writes_the_live_table_dir_of_the_checkpoint_config(tmp_path):
    live = tmp_path / "live"
    model = make(live)
    train_step(model)
    model.save_pretrained(tmp_path / "ckpt")
    train_step(model, seed=2)  # the live table moves on past the checkpoint
    table_of(model).flush()
    before = digest(live)
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")[TABLE_KEY]
    assert not torch.equal(saved, table_of(model).rows(torch.arange(saved.shape[0])))

    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path / "ckpt")  # its config names `live`
    assert digest(live) == before
    table = table_of(loaded)
    folder = os.path.dirname(table.path)
    assert folder != str(live) and loaded.config.engram_table_dir == folder
    assert os.path.dirname(folder) == str(tmp_path)  # a new folder next to the configured one
    assert torch.equal(table.rows(torch.arange(saved.shape[0])), saved)  # the checkpoint is the source of truth
    assert torch.equal(open_table_file(table.path, *saved.shape), saved)  # ... and it is what the file holds

    # asked explicitly to put the tables into a folder that holds a table: refused, nothing written
    with pytest.raises(ValueError, match=r"(?s)live already holds.*new or empty engram_table_dir"):
        SeekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", engram_table_dir=str(live))
    assert digest(live) == before


def _buffered_update(path, rows=64, dim=4, touched=range(0, 64, 2), buffer_rows=64):
    """A committed table of known values plus a buffered update of `touched` rows; returns (table, old, new)."""
    table = EngramTable(rows, dim, "disk", str(path), write_buffer_rows=buffer_rows)
    old = torch.arange(rows * dim, dtype=torch.float32).view(rows, dim)
    with torch.no_grad():
        table.weight.copy_(old)
    table.flush()
    table.train()
    idx = torch.tensor(list(touched))
    (table.gather(idx) * torch.linspace(-1, 1, idx.numel() * dim).view(-1, dim)).sum().backward()
    table.step(0.5)
    new = table.rows(torch.arange(rows))
    assert not torch.equal(new, old) and torch.equal(open_table_file(str(path), rows, dim), old)  # still buffered
    return table, old, new


class Killed(BaseException):
    """Stands for SIGKILL: a BaseException passes every `except Exception`, and the code under test has no
    cleanup on this path, so the files are left as a killed process leaves them (a MAP_SHARED write is in the
    page cache, i.e. in the file, as soon as it is made)."""


def test_flush_killed_midway_recovers_the_new_table_on_reopen(tmp_path, monkeypatch):
    path = str(tmp_path / "t.bin")
    table, old, new = _buffered_update(path)
    monkeypatch.setattr(engram_table, "_FLUSH_CHUNK", 8)  # 32 buffered rows -> 4 chunks written to the file
    original, written = torch.Tensor.index_copy_, []

    def index_copy_(self, dim, index, source):
        if self.data_ptr() == table.weight.data_ptr():
            if len(written) == 2:
                raise Killed  # with half of the rows in the file
            written.append(index.numel())
        return original(self, dim, index, source)

    monkeypatch.setattr(torch.Tensor, "index_copy_", index_copy_)
    with pytest.raises(Killed):
        table.flush()
    monkeypatch.undo()
    with open(path, "rb") as f:  # the raw file really is torn: half of the updated rows are new
        raw = torch.frombuffer(bytearray(f.read()), dtype=torch.float32).view(64, 4)
    assert written == [8, 8] and not torch.equal(raw, old) and not torch.equal(raw, new)
    recovered = open_table_file(path, 64, 4)  # replays the journal
    assert torch.equal(recovered, new)
    assert json.load(open(path + ".json"))["state"] == "complete" and not os.path.exists(path + ".journal")


def test_flush_killed_before_its_journal_is_committed_keeps_the_old_table(tmp_path, monkeypatch):
    path = str(tmp_path / "t.bin")
    table, old, new = _buffered_update(path)
    replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith(".journal"):
            raise Killed  # after writing the journal, before committing it
        replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(Killed):
        table.flush()
    monkeypatch.undo()
    assert torch.equal(open_table_file(path, 64, 4), old)
    assert sorted(os.listdir(tmp_path)) == ["t.bin", "t.bin.json"]  # the uncommitted journal is gone
    table.flush()  # the buffer survived: a later flush completes the update
    assert torch.equal(open_table_file(path, 64, 4), new)


def test_a_flush_for_a_full_buffer_keeps_its_journal_until_the_file_is_synced(tmp_path):
    """Inside `step` a full buffer is flushed without waiting for the writeback; its journal covers a crash."""
    path = str(tmp_path / "t.bin")
    table, old, new = _buffered_update(path, buffer_rows=40)  # 32 rows buffered: 16 new ones overflow it
    idx = torch.arange(1, 33, 2)
    (table.gather(idx) * 0.5).sum().backward()
    table.step(0.5)
    assert table._buffered == 16 and os.path.exists(path + ".journal")  # the 32 rows are in the file + journal
    view = torch.from_file(path, shared=True, size=256, dtype=torch.float32).view(64, 4)
    assert torch.equal(view, new)
    table.flush()  # durable: fsync, then the journal goes
    assert not os.path.exists(path + ".journal") and torch.equal(open_table_file(path, 64, 4), view)
    assert torch.equal(view, table.rows(torch.arange(64))) and not torch.equal(view, new)


def test_a_table_never_writes_a_file_that_replaced_its_own(tmp_path):
    path = str(tmp_path / "t.bin")
    table, old, new = _buffered_update(path)
    for name in os.listdir(tmp_path):  # the folder is emptied and another table is created there
        os.remove(tmp_path / name)
    other = EngramTable(64, 4, "disk", path)
    other.flush()
    before = digest(tmp_path)
    with pytest.raises(ValueError, match=r"(?s)t\.bin is no longer the one this model created"):
        table.flush()
    assert digest(tmp_path) == before


def test_a_table_marked_dirty_without_recovery_info_is_refused_on_open(tmp_path):
    path = str(tmp_path / "t.bin")
    table = EngramTable(8, 4, "disk", path)
    with torch.no_grad():
        table.weight.copy_(torch.randn(8, 4))  # a whole-table write, never committed by a flush
    with pytest.raises(ValueError, match=r"(?s)t\.bin.*dirty.*checkpoint"):
        open_table_file(path, 8, 4)
    table.flush()
    assert open_table_file(path, 8, 4).shape == (8, 4)
    table.load_state_dict({"weight": torch.zeros(8, 4)})  # killed here, the table would be half loaded
    with pytest.raises(ValueError, match=r"(?s)t\.bin.*dirty.*checkpoint"):
        open_table_file(path, 8, 4)
    with pytest.raises(ValueError, match=r"(?s)t\.bin.*\[8, 5\]"):  # a shape the manifest does not hold
        open_table_file(path, 8, 5)


def test_a_damaged_journal_is_refused_on_open(tmp_path, monkeypatch):
    path = str(tmp_path / "t.bin")
    table, old, new = _buffered_update(path)
    monkeypatch.setattr(table, "_apply_rows", lambda *a: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        table.flush()  # the journal is committed, not applied
    with open(path + ".journal", "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\xff" * 8)
    with pytest.raises(ValueError, match=r"(?s)t\.bin\.journal.*damaged.*checkpoint"):
        open_table_file(path, 64, 4)


def test_training_flush_save_reload_round_trips_bit_exactly(tmp_path):
    model = make(tmp_path / "live")
    callback = EngramTableCallback()
    for step in range(3):
        train_step(model, seed=step)
        if step == 1:
            table_of(model).flush()  # a flush between steps changes nothing the model sees
    callback.on_train_end(None, None, None, model=model)  # flushes every table
    for layer in (1, 2):
        path = table_of(model, layer).path
        assert json.load(open(path + ".json"))["state"] == "complete" and not os.path.exists(path + ".journal")
        assert torch.equal(open_table_file(path, *table_of(model, layer).weight.shape), table_of(model, layer).weight)
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", engram_table_dir=str(tmp_path / "t2"))
    got = loaded.state_dict()
    assert got.keys() == expect.keys()
    for key in expect:
        assert torch.equal(got[key], expect[key]), key
    assert table_of(loaded).path == str(tmp_path / "t2" / "engram_layer1.bin")
    train_step(loaded, seed=5)  # the reloaded table trains on, through its own file
    table_of(loaded).flush()
    assert torch.equal(open_table_file(table_of(loaded).path, *expect[TABLE_KEY].shape), table_of(loaded).weight)
    assert not torch.equal(table_of(loaded).weight, expect[TABLE_KEY])
