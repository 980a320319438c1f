"""Evaluation metrics, benchmarks and runner (planned: see README)."""
