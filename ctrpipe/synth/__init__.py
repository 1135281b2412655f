"""Stage 0: deterministic synthetic click logs (Criteo text, Toss-style Parquet) with the true probability
of every row, so the rest of the pipeline can be tested and benchmarked against a known oracle."""

from ctrpipe.synth.common import BLOCK_ROWS, GENERATOR_VERSION, LabelStats
from ctrpipe.synth.run import SplitResult, SynthResult, run_synth, synth_criteo, synth_parquet

__all__ = ["BLOCK_ROWS", "GENERATOR_VERSION", "LabelStats", "SplitResult", "SynthResult", "run_synth",
           "synth_criteo", "synth_parquet"]
