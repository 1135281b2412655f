#!/usr/bin/env bash
# Create (or reuse) .venv with ctrpipe and its dependencies (extras: dev, dask, onnx: the ONNX export and its
# tests). Sourced by demo.sh and test.sh.
# torch is pinned and installed first: `pip install torch==2.13.0` is a CPU build here; an unpinned
# torch would pull a multi-GB CUDA wheel. On a GPU machine install your CUDA torch first and set
# CTRPIPE_SKIP_TORCH=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CTRPIPE_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
if [ "${CTRPIPE_SKIP_TORCH:-0}" != "1" ] && ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${CTRPIPE_TORCH_VERSION:-2.13.0}"
fi
stamp="$venv/.ctrpipe-installed"
# reinstall when the project or the compiled kernel's source changed (the editable install builds the kernel)
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/ctrpipe/_native.c" -nt "$stamp" ]; then
  python -m pip install -q -e "$root[dev,dask,onnx]"
  touch "$stamp"
fi
