#!/usr/bin/env bash
# Shard Criteo text into a cache:  ./shard.sh --input train.txt [--out DIR] [any `ctrpipe shard` option]
# Defaults: --cfg cfgs/criteo.yaml and --out shards/criteo (both relative to this repository).
# Test data: ./shard.sh --input test.txt --test --stats-from shards/criteo --out shards/criteo_test \
#                       --set data.id_offset=60000000
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
args=("$@")
has_out=0
for a in "${args[@]}"; do
  case "$a" in --out|-o|--out=*) has_out=1 ;; esac
done
if [ "$has_out" -eq 0 ]; then
  args+=(--out "$root/shards/criteo")
fi
if ! command -v ctrpipe >/dev/null 2>&1 && [ -f "$root/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$root/.venv/bin/activate"
fi
exec ctrpipe shard --cfg "$root/cfgs/criteo.yaml" "${args[@]}"
