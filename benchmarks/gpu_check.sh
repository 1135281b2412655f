#!/usr/bin/env bash
# The first GPU run (issue 16) as one time-boxed script: correctness, the loader goal, throughput, where the
# GPU waits. Every log lands in $OUT (at most 8 files come back from the device tool): summary.txt, env.txt,
# tests.log, e2e.log, loader.log, throughput.log, profile.txt.
#
# On a lent GPU (the device tool), from the repository root, with polars carried as wheels (the image has the
# other dependencies; its python3 is 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl polars==2.1.0 polars-runtime-32==2.1.0
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590)
# Here, the same steps at toy sizes on the CPU check the script itself (the CUDA tests skip):
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# the scripts under benchmarks/ import ctrpipe from the tree (python puts only the script's folder on the path)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-.bench/gpu_check}"
mkdir -p "$out"
device="${GPU_CHECK_DEVICE:-cuda}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"

if [ "$device" = "cuda" ]; then       # the issue's sizes: 26 x 1M-bin tables, dim 16, batch 16384 (and 65536)
  rows=2000000; bins=1000000; batch=16384; big=65536; steps=30; amp=bf16; e2e_rows=200000; compile=--compile
else                                  # toy sizes: the plumbing, not the figures
  rows=20000; bins=1000; batch=1024; big=4096; steps=3; amp=off; e2e_rows=3000; compile=
fi

step() {  # step NAME SECONDS LOG COMMAND...: run with a time limit, log its output, note rc and seconds
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  echo "$name: rc $rc, $((SECONDS - start)) s" | tee -a "$summary"
  return $rc
}

# --- setup: carried wheels, ctrpipe itself (its compiled kernels built for this Python)
{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
} > "$out/env.txt" 2>&1
if ! "$py" -c "import polars" 2>/dev/null && [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$out/env.txt" 2>&1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import ctrpipe.native as n, sys; sys.exit(not n.native_built())" 2>/dev/null; then
  # builds the compiled kernels in place (the polars path runs without them: the same bytes, slower)
  step setup 60 "$out/env.txt" "$py" -m pip install -q --no-deps --no-build-isolation -e .
fi
"$py" -c "import polars, ctrpipe.native as n; print('polars', polars.__version__, 'native kernels', n.native_built())" \
  >> "$out/env.txt" 2>&1

# --- 1. correctness: the CUDA tests, then the CLI end to end on the GPU (train + infer, DNN and DCN v2, bf16)
# (the test module's name holds "cuda": -k keeps all of it, and the loader's CUDA tests)
step tests 150 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -rs tests/train/test_cuda.py \
  tests/loader/test_loader.py tests/loader/test_sampling.py -k cuda
export work="${GPU_CHECK_WORK:-/tmp/gpu_check_work}" e2e_rows device amp py
rm -rf "$work"
mkdir -p "$work"
e2e() {
  set -e
  cli() { "$py" -m ctrpipe.cli "$@"; }
  cli synth --rows "$e2e_rows" --test-rows $((e2e_rows / 4)) --out "$work/data" -q
  cli shard --cfg cfgs/criteo.yaml --input "$work/data/train.tsv" --gold "$work/data/test.tsv" --out "$work/shards" -q
  for model in dnn dcnv2; do
    cli train --cfg "cfgs/criteo_$model.yaml" --shards "$work/shards" --runs "$work/runs" \
      --set "train.device=$device" --set "train.amp=$amp" --set train.epochs=1 --set train.min_steps=0 \
      --set train.evals_per_epoch=1
    cli infer --run "$work/runs/criteo_$model" --shards "$work/shards" --set infer.view=gold --out "$work/$model.csv"
    "$py" -c "import json; m = json.load(open('$work/runs/criteo_$model/metrics.json'));
print('$model', 'gold AUC', m['gold']['auc'], 'samples/s', round(m['samples_per_s']),
      'device peak MB', (m['peak_device_memory_bytes'] or 0) >> 20)"
  done
}
step e2e 120 "$out/e2e.log" bash -c "$(declare -f e2e); e2e"

# --- 2. the loader goal: end to end from shards / on device-resident batches >= 0.9 at batch 16384
step loader 110 "$out/loader.log" "$py" benchmarks/bench_train.py --device "$device" --amp "$amp" \
  --models dnn,dcnv2 --batch-sizes "$batch" --rows "$rows" --hash-bins "$bins" --steps "$steps" --repeat 2

# --- 3. throughput: DCN v2 at batch 65536, compiled (the issue's stretch: >= 10M samples/s)
step throughput 90 "$out/throughput.log" "$py" benchmarks/bench_train.py --device "$device" --amp "$amp" \
  --models dcnv2 --batch-sizes "$big" --rows "$rows" --hash-bins "$bins" --steps "$steps" --repeat 2 $compile

# --- 4. where the GPU waits: a profile of DCN v2 steps at batch 16384
step profile 50 "$out/profile.txt" "$py" benchmarks/profile_step.py --device "$device" --model dcnv2 \
  --batch-size "$batch" --rows "$rows" --hash-bins "$bins" --amp "$amp" --steps 10

echo "logs: $out" | tee -a "$summary"
