"""Engram token-id compression map P: V -> V' (docs/engram.md, as in DeepSeek's engram_demo_v1).

Every id is decoded and normalised (NFKC -> NFD -> strip accents -> lowercase -> collapse whitespace runs
to one space -> strip, with a sentinel so a lone-space token survives the strip); ids whose normalised
strings are equal share one compressed id. Byte-fallback pieces that decode to U+FFFD are keyed by their
raw token string instead (their bytes are distinct even though their decodings are not). Compressed ids
are numbered in order of first appearance.
"""
from __future__ import annotations

import torch
from tokenizers import Regex, normalizers

_SENTINEL = "\ue000"
NORMALIZER = normalizers.Sequence([
    normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
    normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
    normalizers.Replace(Regex(r"^ $"), _SENTINEL),
    normalizers.Strip(),
    normalizers.Replace(_SENTINEL, " "),
])


def engram_key(text: str, raw_token: str) -> str:
    if "\ufffd" in text:
        return raw_token
    norm = NORMALIZER.normalize_str(text)
    return norm if norm else text


def build_engram_map(tokenizer, vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """tokenizer: a transformers tokenizer (anything with `decode` and `convert_ids_to_tokens`).
    Returns (map [vocab_size] int64 of compressed ids, compressed vocabulary size V').

    `vocab_size` (the model's, default len(tokenizer)) may exceed the tokenizer's: padding ids beyond it
    each get their own compressed id."""
    n_tok = len(tokenizer)
    vocab_size = n_tok if vocab_size is None else vocab_size
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} ids); pass the model's "
                         "config.vocab_size (>= len(tokenizer)).")
    key_to_new: dict[str, int] = {}
    mapping = torch.empty(vocab_size, dtype=torch.long)
    for tid in range(vocab_size):
        if tid < n_tok:
            key = engram_key(tokenizer.decode([tid], skip_special_tokens=False), tokenizer.convert_ids_to_tokens(tid))
        else:
            key = f"\ue001unused-{tid}"  # cannot collide with a decoded string key (private-use prefix)
        mapping[tid] = key_to_new.setdefault(key, len(key_to_new))
    return mapping, len(key_to_new)
