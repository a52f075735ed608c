"""segment() splits a batch over every local device: 1 and 4 (virtual CPU) devices give identical labels."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import chex, numpy as np
    import fseg_jax
    from tiny_models import tiny_vit

    devices = jax.local_devices()
    assert len(devices) == 4, devices
    model = tiny_vit()
    rng = np.random.default_rng(0)
    bank = rng.uniform(0, 1, (6, 32)).astype(np.float32)
    images = rng.integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)  # 3 images: padded to 4, one per device
    four = fseg_jax.segment(images, bank, model=model, return_weights=True)
    one = fseg_jax.segment(images, bank, model=model, return_weights=True, devices=devices[:1])
    chex.assert_shape(four.labels, (3, 40, 56))
    np.testing.assert_array_equal(four.labels, one.labels)
    # one image per device compiles a batch-1 program: XLA may order its float32 sums differently (about
    # 1e-6 on weights of order 0.1-1), never enough to change a label here
    np.testing.assert_allclose(four.weights, one.weights, rtol=0, atol=1e-5)
    assert len(np.unique(four.labels)) > 1
    print("OK")
    """
)


def test_segment_splits_batches_over_devices_with_identical_labels():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


LEARN = textwrap.dedent(
    """
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    from fseg_jax.learning import learn_dictionary

    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(0.2, 1.0, (600, 12)), 0).astype(np.float32)
    four = learn_dictionary(x, 4, steps=10, batch_tokens=128, seed=1)
    one = learn_dictionary(x, 4, steps=10, batch_tokens=128, seed=1, devices=jax.local_devices()[:1])
    # the same batches; the 4-way split sums the gradient in another order (float32 rounding only)
    np.testing.assert_allclose(four.concepts, one.concepts, rtol=1e-4, atol=1e-5)
    print("OK")
    """
)


def test_learning_a_bank_splits_batches_over_devices():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", LEARN], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
