"""Stage 2: the on-disk shard cache (writer, manifest, reader)."""
