#!/usr/bin/env bash
# Train the default config on the default shard cache; extra arguments go to `ctrpipe train`, e.g.
#   CFG=cfgs/criteo_dcnv2.yaml ./train.sh --kfold 5 --set train.epochs=2
# Defaults: CFG=cfgs/criteo.yaml, SHARDS=shards/criteo and --runs runs, all in this repository; paths you give
# (CFG, SHARDS, --runs) are taken from the folder you run it in, as shard.sh and infer.sh take theirs.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
args=("$@")
has_runs=0
for a in "$@"; do
  case "$a" in --runs|--runs=*) has_runs=1 ;; esac
done
if [ "$has_runs" -eq 0 ]; then
  args+=(--runs "$root/runs")
fi
if ! command -v ctrpipe >/dev/null 2>&1 && [ -f "$root/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$root/.venv/bin/activate"
fi
exec ctrpipe train --cfg "${CFG:-$root/cfgs/criteo.yaml}" --shards "${SHARDS:-$root/shards/criteo}" "${args[@]}"
