"""The lm-eval route (`lm_eval run --include_path seekv4/eval/lm_eval_tasks`) reproduces `seekv4 eval`."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")


def make_tiny_tokenizer():
    """A byte-level BPE (vocab 384, id 0 = <|endoftext|>) trained on a few stdlib files."""
    import pathlib
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py", "queue.py")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_hf_model(path):
    """A random 2-layer Llama with the tiny BPE."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.slow
def test_lm_eval_route_matches_seekv4_eval(tmp_path):
    from seekv4.eval import scoring
    from seekv4.eval.lm_eval_tasks import TASKS_DIR
    from seekv4.eval.runner import run_eval

    model = tmp_path / "tiny-llama"
    make_tiny_hf_model(model)
    tasks = ["repo_nextline", "code_needle", "api_recall", "code_perplexity"]
    ours = run_eval(str(model), tasks, ["2k"], str(tmp_path / "ours"), limit=1, progress=False)
    our_samples = {s["id"]: s for s in map(json.loads, (tmp_path / "ours/samples.jsonl").read_text().splitlines())}

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={model},dtype=float32,max_length=2048",
           "--tasks", ",".join(f"seekv4_{t}" for t in tasks), "--include_path", TASKS_DIR,
           "--metadata", json.dumps({"buckets": ["2k"], "limit": 1}), "--device", "cpu", "--batch_size", "1",
           "--output_path", str(tmp_path / "lm"), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = (tmp_path / "lm").rglob("results_*.json")
    lm = json.loads(results_file.read_text())["results"]

    row = ours["scores"]["repo_nextline"]["2048"]
    for metric in ("edit_sim", "exact_match", "exact_match_strict"):
        assert lm["seekv4_repo_nextline"][f"{metric},none"] == pytest.approx(row[metric])
    assert lm["seekv4_code_needle"]["needle_accuracy,none"] == pytest.approx(
        ours["scores"]["code_needle"]["2048"]["needle_accuracy"])
    row = ours["scores"]["api_recall"]["2048"]
    for metric in ("api_match", "api_name_match", "edit_sim", "exact_match"):
        assert lm["seekv4_api_recall"][f"{metric},none"] == pytest.approx(row[metric])
    row = ours["scores"]["code_perplexity"]["2048"]   # same span tokens, same context: same NLL up to float32
    for metric in ("perplexity", "bits_per_byte", "nll"):
        assert lm["seekv4_code_perplexity"][f"{metric},none"] == pytest.approx(row[metric], rel=1e-4)

    # per sample: same prompts, same greedy tokens (ours stops once the prediction is complete)
    compared = 0
    for samples_file in (tmp_path / "lm").rglob("samples_seekv4_*.jsonl"):
        for line in samples_file.read_text().splitlines():
            sample = json.loads(line)
            mine, theirs = our_samples[sample["doc"]["id"]], sample["resps"][0][0]
            if mine["task"] == "code_perplexity":
                assert float(theirs[0]) == pytest.approx(-sum(mine["token_nlls"]), rel=1e-4)
                assert sample["doc"]["span_tokens"] == len(mine["token_nlls"])
            elif mine["task"] == "code_needle":
                assert scoring.first_line(theirs) == mine["prediction"]
            else:
                assert theirs.startswith(mine["generation"])
                assert scoring.extract_next_line(theirs) == mine["prediction"]
            compared += 1
    assert compared == 4


def make_tiny_seekv4_model(path):
    """A random `tiny` seekv4 model with the tiny BPE, saved as users save one."""
    import torch

    from seekv4 import SeekV4Config, SeekV4ForCausalLM

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    config = SeekV4Config.from_preset("tiny", vocab_size=len(tok), bos_token_id=None, eos_token_id=0, pad_token_id=0)
    SeekV4ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)


LM_EVAL_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_lm_eval_cli_is_lm_eval_with_seekv4_imported(monkeypatch):
    """The wrapper hands its arguments to lm-eval's own command line unchanged (the README documents it)."""
    import pathlib

    import lm_eval.__main__

    from seekv4.eval import lm_eval_cli

    seen = []
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.append(list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    lm_eval_cli.main(["run", "--model", "hf", "--model_args", "pretrained=m"])
    assert seen == [["lm_eval", "run", "--model", "hf", "--model_args", "pretrained=m"]]
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "python -m seekv4.eval.lm_eval_cli run --model hf --model_args pretrained=PATH" in readme


@pytest.mark.slow
def test_lm_eval_cli_registers_seekv4_before_lm_eval_builds_the_model(tmp_path):
    """lm-eval's `hf` model cannot load a seekv4 folder in a fresh interpreter (it builds the model before
    importing the tasks' utils.py); imported `seekv4.eval.lm_eval_cli` first, the same call loads it."""
    make_tiny_seekv4_model(tmp_path / "m")
    script = f"""
from lm_eval.models.huggingface import HFLM
kwargs = dict(pretrained={str(tmp_path / "m")!r}, dtype="float32", device="cpu", batch_size=1)
try:
    HFLM(**kwargs)
except ValueError as err:
    print("without:", "does not recognize this architecture" in str(err))
import seekv4.eval.lm_eval_cli
print("with:", type(HFLM(**kwargs).model).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, **LM_EVAL_ENV,
                                                                 "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["without:", "True", "with:", "SeekV4ForCausalLM"]


@pytest.mark.slow
def test_readme_lm_eval_command_on_a_seekv4_folder(tmp_path):
    """The README's lm-eval command (one task, one bucket, one example) on a saved seekv4 folder gives
    `seekv4 eval`'s prediction."""
    from seekv4.eval import scoring
    from seekv4.eval.lm_eval_tasks import TASKS_DIR
    from seekv4.eval.runner import run_eval

    model = tmp_path / "m"
    make_tiny_seekv4_model(model)
    ours = run_eval(str(model), ["code_needle"], ["2k"], str(tmp_path / "ours"), limit=1, progress=False)
    (mine,) = map(json.loads, (tmp_path / "ours/samples.jsonl").read_text().splitlines())
    cmd = [sys.executable, "-m", "seekv4.eval.lm_eval_cli", "run", "--model", "hf",
           "--model_args", f"pretrained={model},dtype=float32,max_length=2048", "--tasks", "seekv4_code_needle",
           "--include_path", TASKS_DIR, "--metadata", json.dumps({"buckets": ["2k"], "limit": 1}),
           "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "lm"), "--log_samples"]
    proc = subprocess.run(cmd, env={**os.environ, **LM_EVAL_ENV, "HF_HOME": str(tmp_path / "hf")},
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (results_file,) = (tmp_path / "lm").rglob("results_*.json")
    assert json.loads(results_file.read_text())["results"]["seekv4_code_needle"]["needle_accuracy,none"] == (
        pytest.approx(ours["scores"]["code_needle"]["2048"]["needle_accuracy"]))
    (samples_file,) = (tmp_path / "lm").rglob("samples_seekv4_code_needle_*.jsonl")
    (sample,) = map(json.loads, samples_file.read_text().splitlines())
    assert sample["doc"]["id"] == mine["id"] and scoring.first_line(sample["resps"][0][0]) == mine["prediction"]
