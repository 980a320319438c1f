"""A byte-level stand-in tokenizer for models that ship none (presets, random weights): id = UTF-8 byte.

Ids 0-255 are bytes; special token ids (pad/bos/eos) that fall below 256 collide with control bytes
that plain text does not contain. The trained code tokenizer is on the roadmap.
"""
from __future__ import annotations


class ByteTokenizer:
    def __init__(self, vocab_size: int, special_ids: set[int] = frozenset()):
        if vocab_size < 256:
            raise ValueError(f"The byte tokenizer needs vocab_size >= 256, the model has {vocab_size}; "
                             "save a tokenizer with the model instead.")
        self.special_ids = set(special_ids)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256 and i not in self.special_ids).decode("utf-8", errors="replace")
