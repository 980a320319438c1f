"""Tokenizers. Today: a byte-level stand-in for untrained presets; the code BPE tokenizer and the Engram
token-id compression map come with later issues."""
from .byte_tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer"]
