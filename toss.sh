#!/usr/bin/env bash
# A Toss-style run end to end (README "A Toss-style run"):
#   synth Parquet train + labelled test -> ctrpipe shard (K folds, co-visitation, a behaviour sequence that
#   shares the candidate item's ids) -> ctrpipe train --kfold K with the DARE + QNN-α config -> ctrpipe infer
#   (fold ensemble, calibration for WLL) -> submission.csv (ID,clicked) -> the same with DIN -> ctrpipe blend
#   submissions. AP, WLL and Score = 0.5*AP + 0.5/(1+WLL) are printed at each step beside the oracle's.
# Sizes: ROWS (default 200000; under 100000 trains with batch 256), TEST_ROWS (default 50000), K folds
# (default 3). Outputs under TOSS_DIR (default: this folder; a relative path is taken from where you run it):
# data/toss, shards/toss*, runs/toss.
# TRAIN_SET: extra words for both trainings, split at spaces, so no spaces inside a value (e.g.
# "--set loader.batch_size=512 --set train.lr=0.002"). CTRPIPE_NO_SETUP=1 uses the active environment
# instead of setting up .venv.
set -euo pipefail
out="$(realpath -m "${TOSS_DIR:-$(dirname "$0")}")"
cd "$(dirname "$0")"
[ "${CTRPIPE_NO_SETUP:-0}" = "1" ] || source scripts/setup_env.sh
rows="${ROWS:-200000}"
test_rows="${TEST_ROWS:-50000}"
k="${K:-3}"
data="$out/data/toss"
shards="$out/shards/toss"
runs="$out/runs/toss"
fold_keys=(--set "data.folds.n_splits=$k")
read -r -a train_set <<< "${TRAIN_SET:-}"
# the configs' batch of 1024 leaves a small file a few steps per fold, too few to learn from: a quarter of it
# below 100k rows, unless TRAIN_SET sets the batch
small_batch=()
if [ "$rows" -lt 100000 ] && [[ "${TRAIN_SET:-}" != *loader.batch_size* ]]; then
  small_batch=(--set loader.batch_size=256)
  echo "toss.sh: $rows rows: training with loader.batch_size=256 (the configs' 1024 gives too few steps)"
fi

if ! python - "$rows" "$test_rows" "$data" <<'PY'
import json, sys
try:
    s = json.load(open(sys.argv[3] + "/synth.json"))
except (OSError, ValueError):
    sys.exit(1)
sys.exit(0 if (s["rows"], s["test_rows"], s["format"]) == (int(sys.argv[1]), int(sys.argv[2]), "parquet") else 1)
PY
then
  ctrpipe synth --format parquet --rows "$rows" --test-rows "$test_rows" --seed 0 --out "$data"
  rm -rf "$shards" "${shards}_test"
fi
# both models read the same data section (cfgs/parquet_example.yaml, click label): one cache serves both
# a cache left by an older ctrpipe (or other settings) is refused with a note; then it is rebuilt
for force in "" --force; do
  ctrpipe shard --cfg cfgs/dare_qnn.yaml --input "$data/train.parquet" --out "$shards" "${fold_keys[@]}" $force &&
    ctrpipe shard --cfg cfgs/dare_qnn.yaml --input "$data/test.parquet" --test --stats-from "$shards" \
      --out "${shards}_test" "${fold_keys[@]}" $force && break
  [ -z "$force" ] || exit 1
done

score() {  # score NAME SUBMISSION: the submission's and the oracle's AP / WLL / Score on the test rows
  python scripts/score_submission.py "$2" --labels "$data/test.parquet" --truth "$data/test.truth.npy" --name "$1"
}
oof() {  # oof NAME RUN: out-of-fold predictions (train rows, each from the fold that left it out), raw and
         # calibrated (fitted on these rows), beside the oracle on the same rows
  python scripts/score_submission.py --oof "$2" --shards "$shards" --labels "$data/train.parquet" \
    --truth "$data/train.truth.npy" --name "$1"
}

for model in dare_qnn din; do
  cfg="cfgs/${model}.yaml"
  [ -f "$cfg" ] || cfg="cfgs/parquet_${model}.yaml"
  rm -rf "${runs:?}/$model"
  ctrpipe train --cfg "$cfg" --shards "$shards" --kfold "$k" --runs "$runs" "${fold_keys[@]}" \
    --set "exp_name=$model" --set infer.calibration.target=wll --set infer.calibration.method=temperature_bias \
    ${small_batch[@]+"${small_batch[@]}"} ${train_set[@]+"${train_set[@]}"}
  oof "$model (out-of-fold)" "$runs/$model"
  ctrpipe infer --run "$runs/$model" --shards "${shards}_test" --out "$runs/$model/submission.csv"
  score "$model (test)" "$runs/$model/submission.csv"
done
ctrpipe blend submissions "$runs/dare_qnn/submission.csv" "$runs/din/submission.csv" \
  --method logit_mean --out "$runs/blend.csv"
score "blend dare_qnn + din (test)" "$runs/blend.csv"
