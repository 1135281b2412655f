#!/usr/bin/env bash
# Train the default config on the default shard cache; extra arguments go to `ctrpipe train`, e.g.
#   CFG=cfgs/criteo_dcnv2.yaml ./train.sh --kfold 5 --set train.epochs=2
set -euo pipefail
cd "$(dirname "$0")"
exec ctrpipe train --cfg "${CFG:-cfgs/criteo.yaml}" --shards "${SHARDS:-shards/criteo}" "$@"
