"""Stage 3: memory-mapped shards -> pinned, device-resident `Batch`es."""
