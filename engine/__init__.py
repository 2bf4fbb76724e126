"""Training engine: data, schedules, checkpoints and the training loop shared by all CLIs."""
