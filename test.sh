#!/usr/bin/env bash
# Quickstart command 2: set up .venv, lint, and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
bash scripts/setup_browser.sh   # headless Chromium for the report's browser test (root + apt-get only)
ruff check ctrpipe tests benchmarks scripts
python -m pytest tests "$@"
