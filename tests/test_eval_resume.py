"""`seekv4 eval` resume: runs are identified by the content of the model and the task data, not the path string."""
import json
import logging
import os

import pytest
import torch

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.cli import main
from seekv4.eval import fingerprint, runner
from seekv4.eval.build import DATA_DIR
from seekv4.eval.prompts import EvalError
from test_eval_runner import fake  # noqa: F401  (fixture: fake generations, prompt = record id)


def save_tiny(path, seed=0):
    torch.manual_seed(seed)
    SeekV4ForCausalLM(SeekV4Config.from_preset("tiny")).save_pretrained(path)


def test_task_fingerprints_are_the_manifest_digests():
    """Computed from the files; the builder's manifest (written from the records) is the reference."""
    manifest = json.loads((DATA_DIR / "manifest.json").read_text())
    per_task, sources = fingerprint.task_fingerprints(DATA_DIR)
    assert per_task == manifest["task_sha256"] and sources == manifest["files"]["sources.jsonl"]


def test_model_fingerprint_is_content_based(tmp_path, monkeypatch):
    model = tmp_path / "m"
    save_tiny(model)
    cache = fingerprint.DigestCache(tmp_path)
    fp = fingerprint.model_fingerprint(str(model), cache)
    assert fp["kind"] == "folder" and fp["tokenizer"] is None
    assert fp["weights"] == fingerprint._digest_files(model, ["model.safetensors"], fingerprint.file_sha256)
    # the same folder however it is spelled
    monkeypatch.chdir(tmp_path)
    for spelling in ("m", "./m/", str(model.resolve()), "../" + tmp_path.name + "/m"):
        assert fingerprint.model_fingerprint(spelling, cache) == fp
    # re-saving with another transformers version changes nothing that is loaded
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}, indent=4))
    assert fingerprint.model_fingerprint("m", cache) == fp
    # each part of the model that changes what is evaluated changes its part of the fingerprint
    (model / "tokenizer.json").write_text("{}")
    with_tok = fingerprint.model_fingerprint("m", cache)
    assert with_tok["tokenizer"] is not None and {k for k in fp if fp[k] != with_tok[k]} == {"tokenizer"}
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": 5}))
    assert fingerprint.model_fingerprint("m", cache)["config"] != fp["config"]
    save_tiny(model, seed=1)
    assert fingerprint.model_fingerprint("m", cache)["weights"] != fp["weights"]


def test_weight_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    model, run = tmp_path / "m", tmp_path / "run"
    save_tiny(model)
    run.mkdir()
    hashed = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: hashed.append(os.path.basename(p)) or real(p))
    cache = fingerprint.DigestCache(run)
    fp = fingerprint.model_fingerprint(str(model), cache)
    cache.save()
    assert hashed.count("model.safetensors") == 1
    again = fingerprint.model_fingerprint(str(model), fingerprint.DigestCache(run))   # a resumed run
    assert again == fp and hashed.count("model.safetensors") == 1
    save_tiny(model, seed=1)                                     # same size, new mtime: hashed again
    assert fingerprint.model_fingerprint(str(model), fingerprint.DigestCache(run))["weights"] != fp["weights"]
    assert hashed.count("model.safetensors") == 2


def test_gguf_and_preset_fingerprints(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    cache = fingerprint.DigestCache(tmp_path)
    assert fingerprint.model_fingerprint(str(gguf), cache) == {"kind": "gguf",
                                                             "sha256": fingerprint.file_sha256(gguf)}
    tiny, gqa = (fingerprint.model_fingerprint(p, cache) for p in ("tiny", "tiny-gqa"))
    assert (tiny["kind"], tiny["preset"], tiny["seed"]) == ("preset", "tiny", 0)
    assert tiny["config"] != gqa["config"]
    with pytest.raises(EvalError, match="has no weight files"):
        fingerprint.model_fingerprint(str(tmp_path), cache)


def test_replaced_model_in_folder_is_refused(fake, tmp_path, capsys):
    model, out = tmp_path / "m", tmp_path / "run"
    save_tiny(model)
    args = ["eval", "--model", str(model), "--tasks", "code_needle", "--buckets", "2k", "--limit", "2",
            "--output", str(out)]
    fake.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        main(args)
    save_tiny(model, seed=1)                                   # new weights, same shapes, same folder name
    fake.fail_after = None
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("seekv4 eval: error: ") and "the model weights" in err and "new --output" in err
    assert "--overwrite" in err and len(fake.calls) == 1     # nothing generated with the new model
    assert (out / "samples.partial.jsonl").exists()          # and nothing discarded

    assert main(args + ["--overwrite"]) == 0                 # start over: both records from the new model
    assert len(fake.calls) == 3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["run"]["model"]["weights"] == samples[0]["run"]["model"]["weights"]
                                     for s in samples)
    assert json.loads((out / "results.json").read_text())["scores"]["code_needle"]["2048"]["n"] == 2


def test_same_folder_spelled_differently_resumes(fake, tmp_path, monkeypatch):
    save_tiny(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    fake.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval("m", ["code_needle"], ["2k"], "run", limit=2, progress=False)
    fake.fail_after = None
    results = runner.run_eval("./m/", ["code_needle"], ["2k"], "run", limit=2, progress=False)
    assert len(fake.calls) == 2 and len(set(fake.calls)) == 2   # each record generated once
    assert results["scores"]["code_needle"]["2048"]["n"] == 2
    again = runner.run_eval(str(tmp_path / "m"), ["code_needle"], ["2k"], "run", limit=2, progress=False)
    assert len(fake.calls) == 2 and again["scores"] == results["scores"]


def test_torn_last_line_is_dropped_and_resume_matches_uninterrupted(tmp_path, monkeypatch, caplog):
    """Real greedy generation on a tiny saved model: interrupted mid-write, resumed = the uninterrupted run."""
    model = str(tmp_path / "m")
    save_tiny(model)
    reference = runner.run_eval(model, ["code_needle"], ["2k"], str(tmp_path / "ref"), limit=2, progress=False)
    ref_lines = (tmp_path / "ref/samples.jsonl").read_text().splitlines(keepends=True)

    real_generate, calls = runner.generate, []

    def interrupted(lm, prompt, task):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(prompt)
        return real_generate(lm, prompt, task)

    monkeypatch.setattr(runner, "generate", interrupted)
    partial = tmp_path / "run/samples.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(model, ["code_needle"], ["2k"], str(tmp_path / "run"), limit=2, progress=False)
    torn = ref_lines[1][:len(ref_lines[1]) // 2]                # the second sample's write cut short
    with open(partial, "a", encoding="utf-8") as f:
        f.write(torn)

    monkeypatch.setattr(runner, "generate", real_generate)
    with caplog.at_level(logging.WARNING, logger="seekv4.eval"):
        results = runner.run_eval(model, ["code_needle"], ["2k"], str(tmp_path / "run"), limit=2, progress=False)
    assert f"dropped a torn last line ({len(torn.encode())} bytes," in caplog.text
    samples = [json.loads(line) for line in (tmp_path / "run/samples.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in ref_lines]
    assert [s["id"] for s in samples] == [s["id"] for s in expected]
    for ours, ref in zip(samples, expected):                  # greedy token ids decoded: exact by construction
        assert (ours["generation"], ours["prediction"], ours["prompt_tokens"]) == (
            ref["generation"], ref["prediction"], ref["prompt_tokens"])
    assert results["scores"] == reference["scores"] and results["scores"]["code_needle"]["2048"]["n"] == 2


def test_damaged_line_is_a_clear_error(fake, tmp_path):
    runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=2, progress=False)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "samples.jsonl").write_text("{not json\n" + lines[1])
    with pytest.raises(EvalError, match=r"line 1 of .*samples.jsonl is not valid JSON.*--overwrite"):
        runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=2, progress=False)


def test_samples_without_a_model_fingerprint_are_refused(fake, tmp_path):
    """Samples of older versions name the model by its --model string only: they cannot be verified."""
    runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=1, progress=False)
    (sample,) = map(json.loads, (tmp_path / "samples.jsonl").read_text().splitlines())
    sample["run"] = {"model": "tiny", "dtype": "float32", "task_sha256": sample["run"]["task_sha256"],
                     "max_new_tokens": 16}
    (tmp_path / "samples.jsonl").write_text(json.dumps(sample) + "\n")
    with pytest.raises(EvalError, match="identified only by the --model string 'tiny'.*new --output.*--overwrite"):
        runner.run_eval("tiny", ["code_needle"], ["2k"], str(tmp_path), limit=1, progress=False)
