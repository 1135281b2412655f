#!/usr/bin/env bash
# Train the default config on the default shard cache; extra arguments go to `ctrpipe train`, e.g.
#   CFG=cfgs/criteo_dcnv2.yaml ./train.sh --kfold 5 --set train.epochs=2
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v ctrpipe >/dev/null 2>&1 && [ -f .venv/bin/activate ]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
exec ctrpipe train --cfg "${CFG:-cfgs/criteo.yaml}" --shards "${SHARDS:-shards/criteo}" "$@"
