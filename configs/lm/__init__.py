"""Language-model configs: `python -m trainers.lm --config=configs/lm/<name>.py`."""
