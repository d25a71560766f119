"""Trainers and examples for tf_moe (absl apps, run with `python -m`)."""
