"""The MoE translation trainer: `python -m trainers.nmt` (see __main__.py)."""
