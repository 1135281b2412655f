"""ctrpipe: click logs -> memory-mappable shards -> GPU-resident batches -> CTR models."""

__version__ = "0.1.0"
