#!/usr/bin/env bash
# Benchmarks sized for a GPU machine, one section per part of the package. Run from anywhere:
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# --- NMF ---
# project() at the example image (n=4880) and a 4096x4096 tile (n=65536), d=1536, k=64 and 256;
# scikit-learn (CPU) only where it finishes in seconds.
"$PY" bench/nmf.py ${NMF_BENCH_ARGS:-} --n 4880 65536 --k 64 256 --d 1536 --solvers admm hals --sklearn-max-work 3e7
