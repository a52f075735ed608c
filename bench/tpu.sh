#!/usr/bin/env bash
# Checks and benchmarks sized for one TPU host (jax[tpu] installed), one prepared script. Run from anywhere:
#   bash bench/tpu.sh
# Nothing here has run on a TPU yet: the splash-attention path is verified on CPU through Pallas' interpreter
# (tests/test_attention.py), so the first section checks the compiled kernel against the XLA formulation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$PY" -m pip install -q --no-deps --no-build-isolation -e .

# --- attention on the TPU: splash (Pallas) against batched XLA, UNI heads (16 x 64), bfloat16 and float32 ---
"$PY" - <<'PYEOF'
import time
import jax, jax.numpy as jnp, numpy as np
from fseg_jax.models.attention import attention, resolve_implementation

print("devices:", jax.devices())
for n in (197, 1025, 4881, 16385):
    for dtype in (jnp.bfloat16, jnp.float32):
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((8 if n < 2000 else 1, n, 16, 64)), dtype) for _ in range(3))
        ref = jax.jit(lambda q, k, v: attention(q, k, v, implementation="batched", precision="highest"))
        out_ref = np.asarray(ref(q, k, v), np.float32)
        line = [f"n={n} {jnp.dtype(dtype).name} auto={resolve_implementation('auto', dtype, n)}"]
        for impl in ("batched", "splash", "xla"):
            f = jax.jit(lambda q, k, v: attention(q, k, v, implementation=impl))
            out = np.asarray(f(q, k, v), np.float32)
            err = np.abs(out - out_ref).max() / np.abs(out_ref).max()
            f(q, k, v).block_until_ready()
            t0 = time.perf_counter()
            for _ in range(5):
                r = f(q, k, v)
            r.block_until_ready()
            line.append(f"{impl} {(time.perf_counter() - t0) / 5 * 1e3:.2f} ms err {err:.1e}")
        print("  ".join(line))
PYEOF

# --- ViT (models) ---
# UNI architecture, random weights, fseg_jax alone (no torch on TPU hosts): tiles/s for batches of 224x224 tiles
# and one 976x1280 image, bfloat16 with splash attention for long sequences, then float32 at highest precision.
"$PY" bench/vit.py --dtype bfloat16 --repeats 5 --frameworks jax --shapes 64x224x224,256x224x224,1x976x1280
"$PY" bench/vit.py --dtype float32 --repeats 5 --frameworks jax --shapes 64x224x224,1x976x1280

# --- NMF ---
"$PY" bench/factorization.py --n 4880 65536 --k 64 256 --d 1536 --solvers admm hals --no-sklearn
