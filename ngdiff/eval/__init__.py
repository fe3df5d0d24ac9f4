"""Evaluation with the benchmarks' own definitions (TOFU, MUSE-News)."""
