"""The lm-eval route (`lm_eval run --include_path seekv4/eval/lm_eval_tasks`) reproduces `seekv4 eval`."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval")


def make_tiny_hf_model(path):
    """A random 2-layer Llama with a byte-level BPE (vocab 384) trained on a few stdlib files."""
    import pathlib
    import sysconfig

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("bisect.py", "heapq.py", "queue.py")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
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
