"""Translation configs: `python -m trainers.nmt --config=configs/nmt/<name>.py`."""
