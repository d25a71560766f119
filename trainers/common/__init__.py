"""What the LM and NMT trainers share: text, schedules, the training loop,
checkpoints, distribution and logging."""
