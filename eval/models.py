"""Load any causal LM for evaluation: a saved folder, a GGUF file, or a seekv4 preset (random weights)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .prompts import EvalError

MAX_RANDOM_PARAMS = 100_000_000  # presets are random baselines: refuse full-size shapes rather than exhaust memory
PRESET_SEED = 0                  # torch seed of a preset's random initialisation (part of its run fingerprint)


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any             # HF tokenizer, or a ByteTokenizer for tokenizer-less seekv4 models
    name: str
    context_length: int        # tokens the model accepts (max_position_embeddings)

    def encode(self, text: str) -> list[int]:
        """Token ids as `tokenizer(text)` gives them (special tokens included), as lm-eval's HFLM does."""
        if hasattr(self.tokenizer, "special_ids"):
            return self.tokenizer.encode(text)
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids) -> str:
        if hasattr(self.tokenizer, "special_ids"):
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _byte_tokenizer(config):
    from ..tokenization import ByteTokenizer

    special = {i for i in (config.pad_token_id, config.bos_token_id, config.eos_token_id) if isinstance(i, int)}
    return ByteTokenizer(config.vocab_size, special)


def model_kind(ref: str) -> str:
    """"gguf", "folder" or "preset" for `--model ref`; EvalError when it is none of them."""
    from .. import list_presets

    if os.path.isfile(ref) and ref.endswith(".gguf"):
        return "gguf"
    if os.path.isdir(ref):
        return "folder"
    if ref in list_presets():
        return "preset"
    if os.path.exists(ref):
        raise EvalError(f"{ref} is a file but not a .gguf file; pass a model folder, a .gguf file or a preset.")
    raise EvalError(f"model {ref!r} does not exist: pass a folder saved with save_pretrained, a .gguf file, "
                    f"or a seekv4 preset ({', '.join(list_presets())}).")


def load_model(ref: str, dtype: str = "float32") -> LoadedModel:
    """`ref`: a folder saved with save_pretrained (with its tokenizer), a `.gguf` file, or a seekv4 preset."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import SeekV4Config, SeekV4ForCausalLM

    torch_dtype = getattr(torch, dtype)
    kind = model_kind(ref)
    if kind == "gguf":
        folder, name = os.path.split(os.path.abspath(ref))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    elif kind == "folder":
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref)
        except (OSError, ValueError) as err:
            if model.config.model_type != "seekv4":
                raise EvalError(f"{ref} has no loadable tokenizer ({err}); save one with "
                                "tokenizer.save_pretrained(folder).") from err
            tokenizer = _byte_tokenizer(model.config)  # seekv4's documented stand-in for tokenizer-less models
    else:
        from ..modeling.summary import parameter_counts

        config = SeekV4Config.from_preset(ref)
        total = parameter_counts(config)["total"]
        if total > MAX_RANDOM_PARAMS:
            raise EvalError(f"preset {ref} has {total:,} parameters; a randomly initialised baseline is only "
                            f"built for presets up to {MAX_RANDOM_PARAMS:,} (e.g. tiny). Pass a trained model folder.")
        torch.manual_seed(PRESET_SEED)
        model = SeekV4ForCausalLM(config).to(torch_dtype)
        tokenizer = _byte_tokenizer(model.config)
    context = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(context, int):
        raise EvalError(f"{ref}: the config has no max_position_embeddings, so the context length is unknown.")
    return LoadedModel(model.eval(), tokenizer, ref, context)
