"""Tokenizers and the Engram token-id compression map (planned: see README)."""
