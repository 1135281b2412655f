#!/usr/bin/env bash
# Predict a test shard cache with a finished run:  ./infer.sh [any `ctrpipe infer` option, e.g. --set infer.view=val]
# Defaults: RUN=runs/criteo_dnn, SHARDS=shards/criteo_test, both in this repository (override by environment:
# RUN=runs/x ./infer.sh; paths you give are taken from the folder you run it in).
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
if ! command -v ctrpipe >/dev/null 2>&1 && [ -f "$root/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$root/.venv/bin/activate"
fi
exec ctrpipe infer --run "${RUN:-$root/runs/criteo_dnn}" --shards "${SHARDS:-$root/shards/criteo_test}" "$@"
