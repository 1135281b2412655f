"""Stage 1: raw input (Criteo text, Parquet) -> typed, transformed column chunks."""
