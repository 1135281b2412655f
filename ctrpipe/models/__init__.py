"""Stage 4: the model zoo. Models take a `FeatureSpec` and their config, map a `Batch` to logits (B, T)."""
