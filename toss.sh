#!/usr/bin/env bash
# A Toss-style run end to end (README "A Toss-style run"):
#   synth Parquet train + labelled test -> ctrpipe shard (K folds, co-visitation, a behaviour sequence that
#   shares the candidate item's ids) -> ctrpipe train --kfold K with the DARE + QNN-α config -> ctrpipe infer
#   (fold ensemble, calibration for WLL) -> submission.csv (ID,clicked) -> the same with DIN -> ctrpipe blend
#   submissions. AP, WLL and Score = 0.5*AP + 0.5/(1+WLL) are printed at each step beside the oracle's.
# Sizes: ROWS (default 200000), TEST_ROWS (default 50000), K folds (default 3); outputs under data/toss,
# shards/toss*, runs/toss.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
rows="${ROWS:-200000}"
test_rows="${TEST_ROWS:-50000}"
k="${K:-3}"
data=data/toss
fold_keys=(--set "data.folds.n_splits=$k")

if ! python - "$rows" "$test_rows" <<'PY'
import json, sys
try:
    s = json.load(open("data/toss/synth.json"))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if (s["rows"], s["test_rows"], s["format"]) == (int(sys.argv[1]), int(sys.argv[2]), "parquet") else 1)
PY
then
  ctrpipe synth --format parquet --rows "$rows" --test-rows "$test_rows" --seed 0 --out "$data"
  rm -rf shards/toss shards/toss_test
fi
# both models read the same data section (cfgs/parquet_example.yaml, click label): one cache serves both
# a cache left by an older ctrpipe (or other settings) is refused with a note; then it is rebuilt
for force in "" --force; do
  ctrpipe shard --cfg cfgs/dare_qnn.yaml --input "$data/train.parquet" --out shards/toss "${fold_keys[@]}" $force &&
    ctrpipe shard --cfg cfgs/dare_qnn.yaml --input "$data/test.parquet" --test --stats-from shards/toss \
      --out shards/toss_test "${fold_keys[@]}" $force && break
  [ -z "$force" ] || exit 1
done

score() {  # score NAME SUBMISSION: the submission's and the oracle's AP / WLL / Score on the test rows
  python scripts/score_submission.py "$2" --labels "$data/test.parquet" --truth "$data/test.truth.npy" --name "$1"
}
oof() {  # oof RUN: out-of-fold metrics of a K-fold run (train rows, each predicted by the fold that left it out)
  python -c "import json,sys; m=json.load(open(sys.argv[1]+'/metrics.json')); \
o=m.get('oof') or m.get('val'); print(sys.argv[1]+' out-of-fold:', {k: round(o[k],5) for k in ('ap','wll','score','auc')})" "$1"
}

for model in dare_qnn din; do
  cfg="cfgs/${model}.yaml"
  [ -f "$cfg" ] || cfg="cfgs/parquet_${model}.yaml"
  rm -rf "runs/toss/$model"
  ctrpipe train --cfg "$cfg" --shards shards/toss --kfold "$k" --runs runs/toss \
    --set "exp_name=$model" --set infer.calibration.target=wll --set infer.calibration.method=temperature_bias
  oof "runs/toss/$model"
  ctrpipe infer --run "runs/toss/$model" --shards shards/toss_test --out "runs/toss/$model/submission.csv"
  score "$model (test)" "runs/toss/$model/submission.csv"
done
ctrpipe blend submissions runs/toss/dare_qnn/submission.csv runs/toss/din/submission.csv \
  --method logit_mean --out runs/toss/blend.csv
score "blend dare_qnn + din (test)" runs/toss/blend.csv
