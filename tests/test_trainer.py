"""Plain `transformers.Trainer` trains a seekv4 MoE model (aux loss included) and the loss falls."""
import datasets
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from seekv4 import SeekV4Config, SeekV4ForCausalLM


class UpdateRouterBiases(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.update_router_biases()


def test_trainer_reduces_loss_with_aux_loss_and_bias_updates(tmp_path):
    torch.manual_seed(0)
    model = SeekV4ForCausalLM(SeekV4Config.from_preset("tiny", aux_loss_alpha=1e-3))
    # a learnable pattern: repeating sequences
    base = torch.randint(3, 256, (8, 8), generator=torch.Generator().manual_seed(0))
    ids = base.repeat(1, 4)
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_steps=30,
                             per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True,
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False})
    bias_before = model.model.layers[2].mlp.gate.e_score_correction_bias.clone()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[UpdateRouterBiases()])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert not torch.equal(model.model.layers[2].mlp.gate.e_score_correction_bias, bias_before)
