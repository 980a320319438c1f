"""mHC stability: composite mixing gain over depth (hc vs mhc), and a tiny seed-v4 trained under Trainer.

    python bench/mhc_stability.py [--steps 300] [--layers 64]

Part 1 builds a stack of residual sites with the sublayer replaced by a fixed random map, perturbs every
site's parameters by N(0, σ²) (a stand-in for trained weights), and prints the mHC paper's 'Amax gain' of
the product of the mixing matrices (max abs row/column sum) at several depths. Part 2 trains `tiny-seed-v4`
(MLA + DSA + MoE + mHC + Engram + MTP, hidden 64) on a learnable repeating-sequence task.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_residual import _stack_gain  # noqa: E402  (same stack as the acceptance test)


def gain_table(layers: int):
    print(f"composite mixing gain after L sites (max over 16 tokens), {layers}-site stack")
    depths = [d for d in (1, 4, 16, 32, 64, 128) if d <= layers]
    print("| kind | σ | " + " | ".join(f"L={d}" for d in depths) + " |")
    print("|---|---|" + "---|" * len(depths))
    for kind in ("hc", "mhc"):
        for sigma in (0.05, 0.1, 0.2):
            cells = [_stack_gain(kind, d, sigma)[0] for d in depths]
            print(f"| {kind} | {sigma} | " + " | ".join(f"{g:.3g}" for g in cells) + " |")


def train(steps: int):
    import datasets
    from transformers import Trainer, TrainingArguments

    from seekv4 import SeekV4Config, SeekV4ForCausalLM
    from seekv4.training import EngramTableCallback

    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset("tiny-seed-v4", max_position_embeddings=2048))
    base = torch.randint(3, 256, (64, 8), generator=torch.Generator().manual_seed(0))
    ids = base.repeat(1, 4)  # [64, 32]
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir="/tmp/seekv4_mhc_bench", use_cpu=True, report_to="none", max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=10,
                             save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[EngramTableCallback()])
    start = time.time()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    finite = all(math.isfinite(h["loss"]) for h in logs)
    print(f"\ntiny-seed-v4 under Trainer: {steps} steps in {time.time() - start:.0f}s, all losses finite: {finite}")
    print("| step | loss |")
    print("|---|---|")
    for h in logs[:: max(1, len(logs) // 10)] + ([logs[-1]] if len(logs) % 10 else []):
        print(f"| {h['step']} | {h['loss']:.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=64)
    a = p.parse_args()
    gain_table(a.layers)
    train(a.steps)
