"""Trainer glue for parts of the model that the Trainer's optimizer does not update."""
from __future__ import annotations

from transformers import TrainerCallback

from .modeling.engram_table import EngramTable


class EngramTableCallback(TrainerCallback):
    """After every optimizer step, apply the row-wise sparse update to the Engram tables (their rows are not
    Trainer parameters, see modeling/engram_table.py) at the Trainer's current learning rate × `lr_scale`."""

    def __init__(self, lr_scale: float = 1.0):
        if not lr_scale > 0:
            raise ValueError(f"EngramTableCallback(lr_scale={lr_scale!r}): expected a positive number.")
        self.lr_scale = lr_scale

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        model = getattr(model, "module", model)  # DDP wrapper
        model.step_engram_tables(lr * self.lr_scale)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        for module in getattr(model, "module", model).modules():
            if isinstance(module, EngramTable):
                module.flush()  # disk tables: write the buffered rows to the file
