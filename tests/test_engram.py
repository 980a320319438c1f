"""Engram: golden hashes, compression map, decode/cache consistency, sparse training, storage, errors."""
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.modeling.engram import NgramHasher, _is_prime
from seekv4.modeling.engram_table import EngramTable, open_table_file
from seekv4.tokenization.engram_map import build_engram_map

ENGRAM = dict(engram_layer_ids=[1, 2], engram_vocab_size=[10, 20], engram_n_heads=2, engram_head_dim=8)


def cfg(**kw):
    return SeekV4Config.from_preset("tiny", **{**ENGRAM, "residual_kind": "mhc", **kw})


def make(**kw):
    torch.manual_seed(0)
    return SeekV4ForCausalLM(cfg(**kw)).eval()


def ids(batch=2, length=16, seed=1):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# multipliers of layer 1 for seed 0, vocab 256: numpy.default_rng(0 + 10007·1).integers(0, (2^63-1)//256//2, 3)·2+1
GOLDEN_R1 = [29662608052400909, 1873410163432121, 13919202536988139]


def test_hash_golden_values_by_hand():
    h = NgramHasher(cfg())
    assert h.multipliers[1] == GOLDEN_R1
    # distinct primes, searched upwards from each order's base size, never reused across heads/orders/layers
    assert h.primes == {1: [[11, 13], [23, 29]], 2: [[17, 19], [31, 37]]}
    # hand computation with Python integers: ids (5, 7, 9) after two pad (0) columns
    r = GOLDEN_R1
    seq, expect = [0, 0, 5, 7, 9], []
    for t in range(2, 5):
        m2 = (seq[t] * r[0]) ^ (seq[t - 1] * r[1])
        m3 = m2 ^ (seq[t - 2] * r[2])
        expect.append([m2 % 11, m2 % 13 + 11, m3 % 23 + 24, m3 % 29 + 47])
    assert expect == [[4, 16, 43, 51], [8, 14, 37, 59], [8, 21, 43, 70]]  # frozen golden values
    got = h.hash(torch.tensor([seq]), 1)
    assert got[0].tolist() == expect


def test_hash_deterministic_across_processes():
    code = ("import torch; from seekv4 import SeekV4Config; from seekv4.modeling.engram import NgramHasher;"
            "c = SeekV4Config.from_preset('tiny', engram_layer_ids=[1, 3], engram_vocab_size=1000, engram_seed=7);"
            "h = NgramHasher(c); x = torch.arange(40).view(2, 20) * 6 % 256;"
            "print(h.multipliers, h.primes, h.hash(x, 3).sum().item(), h.hash(x, 1)[1, -1].tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    c = SeekV4Config.from_preset('tiny', engram_layer_ids=[1, 3], engram_vocab_size=1000, engram_seed=7)
    h, x = NgramHasher(c), torch.arange(40).view(2, 20) * 6 % 256
    assert other.strip() == f"{h.multipliers} {h.primes} {h.hash(x, 3).sum().item()} {h.hash(x, 1)[1, -1].tolist()}"
    primes = NgramHasher(SeekV4Config.from_preset("tiny", engram_layer_ids=[1, 3], engram_vocab_size=1000)).primes
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(set(flat)) == len(flat) and all(_is_prime(p) and p >= 1000 for p in flat)


def test_compression_map_normalisation():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "Hello", "hello", "HÉLLO", " hello", " ", "\t", "  ", "Cafe", "café", "x"]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)},
                                                                              unk_token="<pad>")))
    mapping, size = build_engram_map(tok, vocab_size=13)
    m = mapping.tolist()
    assert m[1] == m[2] == m[3] == m[4]  # case, accents, surrounding whitespace
    assert m[5] == m[6] == m[7] and m[5] != m[1]  # whitespace-only tokens collapse to one space, kept
    assert m[8] == m[9] and m[10] not in (m[1], m[5], m[8])
    assert m[11] != m[12] and size == len(set(m)) == 7  # ids beyond the tokenizer stay distinct
    model = make()
    model.model.engram.set_token_map(torch.arange(256) % 200)
    with pytest.raises(ValueError, match="build_engram_map"):
        model.model.engram.set_token_map(mapping)


@pytest.mark.parametrize("kw", [dict(), dict(engram_kernel_size=0, residual_kind="plain")])
def test_incremental_decode_matches_full_forward(kw):
    model, x = make(**kw), ids(length=20)
    with torch.no_grad():
        full = model(x, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(x[:, :7], past_key_values=cache).logits, model(x[:, 7:9], past_key_values=cache).logits]
        steps += [model(x[:, t:t + 1], past_key_values=cache).logits for t in range(9, 20)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_engram_changes_output():
    model, x = make(), ids()
    with torch.no_grad():
        a = model(x).logits
        model.model.layers[1].engram.table.weight.mul_(3)
        assert (model(x).logits - a).abs().max() > 1e-4


def test_left_padding_beam_search_and_cache_ops():
    model = make(pad_token_id=0)
    a, b = ids(1, 14, seed=2)[0], ids(1, 9, seed=3)[0]
    batch, mask = torch.zeros(2, 14, dtype=torch.long), torch.zeros(2, 14, dtype=torch.long)
    batch[0], mask[0] = a, 1
    batch[1, 5:], mask[1, 5:] = b, 1
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 14:], model.generate(a[None], **kw)[0, 14:])
    assert torch.equal(together[1, 14:], model.generate(b[None], **kw)[0, 9:])
    beams = dict(kw, num_beams=3, num_return_sequences=2)
    with_cache = model.generate(batch, attention_mask=mask, **beams)
    assert torch.equal(with_cache, model.generate(batch, attention_mask=mask, use_cache=False, **beams))
    # crop / batch_select keep the Engram history consistent with the attention cache
    x = ids(2, 12)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(x, past_key_values=cache)
        cache.crop(-4)
        cache.batch_select_indices(torch.tensor([1]))
        step = model(x[1:, 8:9], past_key_values=cache).logits
        full = model(x[1:, :9], use_cache=False).logits[:, -1:]
    assert (step - full).abs().max().item() <= 1e-5


def test_gradients_and_only_touched_rows_change():
    model = make()
    model.train()
    x = ids(2, 10)
    out = model(x, labels=x)
    out.loss.backward()
    eng = model.model.layers[1].engram
    for p in (eng.wkv.weight, eng.q_norm, eng.k_norm, eng.conv.weight, eng.conv_norm):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert eng.table.weight.grad is None and eng.table.has_grad()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    before = {i: model.model.layers[i].engram.table.weight.clone() for i in (1, 2)}
    opt.step()
    for i in (1, 2):  # the dense optimizer never touches the table
        assert torch.equal(model.model.layers[i].engram.table.weight, before[i])
    touched = model.step_engram_tables(lr=1e-2)
    with torch.no_grad():
        idx = model.model.engram.indices(model.model.engram.compress(x, None), None)
    for i in (1, 2):
        rows = torch.unique(idx[i])
        assert torch.equal(touched[i], rows)
        changed = (model.model.layers[i].engram.table.weight != before[i]).any(-1).nonzero().flatten()
        assert set(changed.tolist()) <= set(rows.tolist()) and len(changed) > 0.9 * len(rows)
    assert not model.model.layers[1].engram.table.has_grad()


@pytest.mark.parametrize("storage", ["device", "host", "disk"])
def test_storage_save_load_roundtrip(tmp_path, storage):
    kw = dict(engram_storage=storage, engram_table_dir=str(tmp_path / "tables") if storage == "disk" else None)
    model = make(**kw)
    model.model.engram.set_token_map(torch.arange(256) % 97)
    model.save_pretrained(tmp_path / "ckpt")
    x = ids()
    load_kw = dict(engram_table_dir=str(tmp_path / "tables2")) if storage == "disk" else {}
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", **load_kw).eval()
    assert torch.equal(loaded.model.engram.token_map, model.model.engram.token_map)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits)
    table = loaded.model.layers[1].engram.table
    assert table.storage == storage and not table.weight.requires_grad
    if storage == "disk":
        assert (tmp_path / "tables2" / "engram_layer1.bin").stat().st_size == table.weight.numel() * 4
        weight = table.weight
        assert weight.untyped_storage().filename == str(tmp_path / "tables2" / "engram_layer1.bin")


def _train_step(table, idx, lr=0.1):
    """One sparse step: loss = Σ rows · w (w fixed per position), so the row gradients are known."""
    table.train()
    rows = table.gather(idx)  # [N, D]
    w = torch.linspace(-1, 1, idx.numel() * table.dim).view(idx.numel(), table.dim)
    (rows * w).sum().backward()
    return table.step(lr)


def test_disk_write_buffer_reads_flush_and_threshold(tmp_path):
    """A disk table with a 6-row write-back buffer against the same updates applied to a RAM table."""
    init = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    ram = EngramTable(40, 4)
    disk = EngramTable(40, 4, "disk", str(tmp_path / "t.bin"), write_buffer_rows=6)
    with torch.no_grad():
        ram.weight.copy_(init), disk.weight.copy_(init)
    disk.flush()  # commits the directly written rows: a table is `dirty` (not openable) until its first flush
    file = open_table_file(str(tmp_path / "t.bin"), 40, 4)  # an independent view of the file
    # step 1: 4 rows -> buffered; the file is untouched, reads see the update
    assert torch.equal(_train_step(ram, torch.tensor([3, 9, 3, 17, 30])),
                       _train_step(disk, torch.tensor([3, 9, 3, 17, 30])))
    assert torch.equal(file, init) and disk._buffered == 4
    assert torch.equal(disk.gather(torch.arange(40)), ram.weight) and not torch.equal(ram.weight, init)
    # step 2: rows 9, 17 hit the buffer, 5 and 6 are new (6 buffered = capacity): still nothing written
    for t in (ram, disk):
        _train_step(t, torch.tensor([9, 17, 5, 6]))
    assert torch.equal(file, init) and disk._buffered == 6
    assert torch.equal(disk.rows(torch.arange(40)), ram.weight)
    # step 3: a new row overflows the buffer -> sorted flush of the 6, then the step is buffered
    for t in (ram, disk):
        _train_step(t, torch.tensor([11, 3]))
    assert disk._buffered == 2
    expect_file = ram.weight.clone()
    expect_file[[3, 11]] = file[[3, 11]]  # the rows of step 3 are still only in the buffer
    assert torch.equal(file, expect_file)
    assert torch.equal(disk.prefetch(torch.arange(40)).wait(), ram.weight)  # worker-thread read path
    # a step touching more rows than the buffer holds goes straight to the file (after a flush)
    for t in (ram, disk):
        _train_step(t, torch.arange(20, 30))
    assert disk._buffered == 0 and torch.equal(file, ram.weight)
    for t in (ram, disk):
        _train_step(t, torch.tensor([0, 39]))
    disk.flush()
    assert disk._buffered == 0 and torch.equal(file, ram.weight)
    changed = (file != init).any(-1).nonzero().flatten().tolist()  # only touched rows changed
    assert changed == [0, 3, 5, 6, 9, 11, 17] + list(range(20, 31)) + [39]


def test_disk_buffered_updates_save_load_roundtrip(tmp_path):
    model = make(engram_storage="disk", engram_table_dir=str(tmp_path / "tables"))
    model.train()
    x = ids(2, 10)
    model(x, labels=x).loss.backward()
    touched = model.step_engram_tables(lr=0.5)
    table = model.model.layers[1].engram.table
    assert table._buffered == len(touched[1])  # all updates still in RAM
    model.eval()
    with torch.no_grad():
        expect = model(x).logits
    model.save_pretrained(tmp_path / "ckpt")  # state_dict flushes: the checkpoint holds the updates
    assert table._buffered == 0
    loaded = SeekV4ForCausalLM.from_pretrained(tmp_path / "ckpt", engram_table_dir=str(tmp_path / "t2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expect)
        torch.testing.assert_close(model(x).logits, expect)
    loaded.train()  # the loaded table trains through its own (fresh) buffer
    loaded(x, labels=x).loss.backward()
    before = loaded.model.layers[1].engram.table.rows(touched[1])
    assert torch.equal(loaded.step_engram_tables(lr=0.5)[1], touched[1])
    assert not torch.equal(loaded.model.layers[1].engram.table.rows(touched[1]), before)


@pytest.mark.parametrize("kw, field", [
    (dict(engram_layer_ids=[4]), "engram_layer_ids"),
    (dict(engram_layer_ids=[-1]), "engram_layer_ids"),
    (dict(engram_layer_ids=[1, 1]), "engram_layer_ids"),
    (dict(engram_max_ngram_size=1), "engram_max_ngram_size"),
    (dict(engram_vocab_size=[10, 0]), "engram_vocab_size"),
    (dict(engram_vocab_size=-5), "engram_vocab_size"),
    (dict(engram_vocab_size=[10]), "engram_vocab_size"),
    (dict(engram_storage="ssd"), "engram_storage"),
    (dict(engram_storage="disk"), "engram_table_dir"),
    (dict(engram_storage="disk", engram_table_dir="t", engram_write_buffer_mib=0), "engram_write_buffer_mib"),
    (dict(pad_token_id=None), "engram_pad_id"),
])
def test_bad_engram_config_names_field(kw, field):
    with pytest.raises(ValueError, match=f"SeekV4Config.{field}="):
        SeekV4Config.from_preset("tiny", **{**ENGRAM, **kw})


def test_inputs_embeds_only_is_an_error():
    model = make()
    with pytest.raises(ValueError, match="Engram layers look up token ids"):
        model(inputs_embeds=torch.randn(1, 4, 64))


def test_v41_flash_preset_table_rows_and_active_parameters():
    """Spec §6.7: V4.1-Flash's two tables have 384,006,168 and 384,016,682 rows of 256; a token reads
    3 orders x 8 heads rows per table, so only 2 x 24 x 256 table parameters are active."""
    from seekv4.modeling.summary import parameter_counts

    config = SeekV4Config.from_preset("deepseek-v4.1-flash")
    h = NgramHasher(config)
    assert [sum(h.table_sizes(layer)) for layer in (1, 14)] == [384_006_168, 384_016_682]
    tiny = cfg()  # 2 Engram layers, orders 2-3 x 2 heads x 8 wide
    counts, plain = parameter_counts(tiny), parameter_counts(cfg(engram_layer_ids=[]))
    tables = sum(sum(NgramHasher(tiny).table_sizes(layer)) * 8 for layer in (1, 2))
    assert counts["engram_tables"] == tables
    assert (counts["active_per_token"] - counts["total"]
            == plain["active_per_token"] - plain["total"] - tables + 2 * 4 * 8)
