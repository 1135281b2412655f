"""Stage 5: the training loop, whole-set metrics and checkpoints."""
