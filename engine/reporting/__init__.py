"""Reporting: the progress line and log.txt, tensorboard, W&B."""
