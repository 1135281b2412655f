#!/usr/bin/env bash
# Quickstart command 1: set up .venv, then run the main job end to end on generated data:
#   ctrpipe synth -> ctrpipe shard (train + gold, and a test cache) -> ctrpipe train -> ctrpipe infer
# Sizes: ROWS (default 400000 training rows) and TEST_ROWS (default 100000). Outputs go under data/demo,
# shards/demo*, runs/demo; re-running rebuilds the run but reuses the caches when nothing changed.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
rows="${ROWS:-400000}"
test_rows="${TEST_ROWS:-100000}"
cfg=cfgs/demo.yaml

# regenerate the data only when the sizes changed, so a re-run reuses the shard caches (fingerprint match)
if ! python - "$rows" "$test_rows" <<'PY'
import json, sys
try:
    s = json.load(open("data/demo/synth.json"))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if (s["rows"], s["test_rows"], s["seed"]) == (int(sys.argv[1]), int(sys.argv[2]), 0) else 1)
PY
then
  ctrpipe synth --format criteo --rows "$rows" --test-rows "$test_rows" --seed 0 --out data/demo
  rm -rf shards/demo shards/demo_test   # built from the old files: the new data needs new caches
fi
# the synthetic test file is labelled: it doubles as the gold-evaluation split of the training cache
# a cache left by an older ctrpipe (or other settings) is refused with a note; the demo then rebuilds it
ctrpipe shard --cfg "$cfg" --input data/demo/train.tsv --gold data/demo/test.tsv --out shards/demo ||
  ctrpipe shard --cfg "$cfg" --input data/demo/train.tsv --gold data/demo/test.tsv --out shards/demo --force
ctrpipe shard --cfg "$cfg" --input data/demo/test.tsv --test --stats-from shards/demo --out shards/demo_test ||
  ctrpipe shard --cfg "$cfg" --input data/demo/test.tsv --test --stats-from shards/demo --out shards/demo_test --force
ctrpipe inspect shards/demo >/dev/null 2>&1 || ctrpipe inspect shards/demo     # its checks only when one fails
rm -rf runs/demo
ctrpipe train --cfg "$cfg" --shards shards/demo
ctrpipe infer --run runs/demo --shards shards/demo_test --out runs/demo/submission.csv
python - <<'PY'
import json
m = json.load(open("runs/demo/metrics.json"))
s = json.load(open("data/demo/synth.json"))
gold = m.get("gold") or {}
oracle = s["splits"]["test"]["labels"]["click"]
print("\nvalidation:", {k: round(v, 4) for k, v in m["val"].items() if k in ("auc", "logloss", "wll", "score")})
print("gold (test rows):", {k: round(v, 4) for k, v in gold.items() if k in ("auc", "logloss", "wll", "score")})
print("oracle on the test rows (true probabilities):", {"auc": oracle["oracle_auc"], "logloss": oracle["oracle_logloss"]})
print("submission: runs/demo/submission.csv  (sidecar runs/demo/submission.csv.json)")
PY
