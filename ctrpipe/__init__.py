"""ctrpipe: click logs -> memory-mappable shards -> GPU-resident batches -> CTR models."""

__version__ = "0.1.0"

__all__ = ["Predictor"]


def __getattr__(name: str) -> object:
    # lazy: `import ctrpipe` stays light (no torch) until the Predictor is asked for
    if name == "Predictor":
        from ctrpipe.serve.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'ctrpipe' has no attribute {name!r}")
