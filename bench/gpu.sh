#!/usr/bin/env bash
# Benchmarks sized for one GPU machine (about 9 minutes on an H200 host), one section per part of the package, the
# most wanted figures first. Run from anywhere:
#   bash bench/gpu.sh
# The shared data (the example image, the concept banks) are read from ../shared/data beside the clone; sections
# that need them say so and go on where they are absent.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# the package itself, over whatever jax/flax/torch the machine has (the model manifests ship as package data)
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
lscpu | grep -E "Model name|^CPU\(s\)"
lscpu | grep -o -E "avx512_bf16|amx_bf16" | sort -u | tr '\n' ' '
echo
nvidia-smi -L || true

# --- ViT on the GPU ---
# UNI architecture (ViT-L/16), random weights, bfloat16: fseg_jax against timm (model.to(bfloat16)) in the same
# run; tiles/s for batches of 224x224 tiles, and one 976x1280 image (4880 patches).
"$PY" bench/vit.py --dtype bfloat16 --repeats 5 --frameworks jax,timm --shapes 64x224x224,256x224x224,1x976x1280 \
    ${VIT_BENCH_ARGS:-}

# --- ViT on the host's CPU, 2 cores ---
# GPU hosts carry server CPUs (Intel Xeons with AMX here): the CPU path against timm on two of their cores, as on
# the 2-core machines the CPU figures come from.
CPU=(env JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= taskset -c 0,1)
"${CPU[@]}" "$PY" bench/vit.py --dtype bfloat16 --frameworks jax,jax-float32,timm --shapes 8x224x224
"${CPU[@]}" "$PY" bench/vit.py --dtype bfloat16 --frameworks jax,timm --shapes 1x976x1280 --repeats 1
"${CPU[@]}" "$PY" bench/vit.py --dtype float32 --frameworks jax,timm --shapes 8x224x224,1x976x1280 --repeats 1

# --- ViT on the GPU, float32 ---
# full precision on both sides (batched query-chunk attention, never the CPU loop), then TF32 opt-in
"$PY" bench/vit.py --dtype float32 --repeats 3 --frameworks jax,timm --shapes 64x224x224,1x976x1280
"$PY" bench/vit.py --dtype float32 --repeats 3 --frameworks jax --precision default --shapes 64x224x224

# --- NMF ---
# project() at the example image (n=4880) and a 4096x4096 tile (n=65536), d=1536, k=64 and 256;
# scikit-learn (CPU) only where it finishes in seconds.
"$PY" bench/factorization.py ${NMF_BENCH_ARGS:-} --n 4880 65536 --k 64 256 --d 1536 --solvers admm hals --sklearn-max-work 3e7

# --- segment ---
# End to end on example_3.jpg (1270x975), UNI architecture (random weights), k = 64: first call, warm call, ViT
# forward and the post-ViT program (NNLS, upsampling, argmax) timed apart, and first calls of new processes with
# an empty and a filled persistent compilation cache. The original (torch on the CPU) is left out here.
"$PY" bench/segment.py --skip-original ${SEGMENT_BENCH_ARGS:-}

# --- slide ---
# Whole-slide throughput (needs the wsi extra and the example SVS): UNI architecture (random weights) in bfloat16,
# 1024 px tiles with 64 px margins at 0.5 um/px, batch 32.
"$PY" bench/slide.py --gpu --dtype bfloat16 --tile 1024 --margin 64 --batch 32 --mpp 0.5 ${SLIDE_BENCH_ARGS:-}
