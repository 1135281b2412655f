"""Tools around the pipeline: `ctrpipe plan` (memory estimate before a run) and `ctrpipe doctor` (environment)."""
