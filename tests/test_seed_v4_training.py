"""tiny seed-v4 (MLA + DSA + MoE + mHC + Engram + MTP) trains under Trainer; Engram rows update sparsely.
The 300-step run is `bench/mhc_stability.py` (figures in bench/RESULTS.md)."""
import math

import datasets
import torch
from transformers import Trainer, TrainingArguments

from seekv4 import SeekV4Config, SeekV4ForCausalLM
from seekv4.training import EngramTableCallback


def test_tiny_seed_v4_trains_under_trainer(tmp_path):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset("tiny-seed-v4", max_position_embeddings=2048))
    ids = torch.randint(3, 256, (8, 8), generator=torch.Generator().manual_seed(0)).repeat(1, 4)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=20,
                             per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    table = model.model.layers[1].engram.table
    before = table.weight.clone()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[EngramTableCallback()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    changed = (table.weight != before).any(-1)
    assert 0 < changed.sum() < table.num_rows  # touched rows only
    with torch.no_grad():
        out = model(ids[:4], labels=ids[:4])
    assert out.mtp_loss is not None and torch.isfinite(out.loss)
