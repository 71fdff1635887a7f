"""Training: the optimizer engine, checkpoints, the OPSD and SFT loops."""
