"""Banks learned for NNLS projection (optax): better reconstruction than the k-means start, deterministic,
resumable, the same on 1 and several devices."""

from __future__ import annotations

import numpy as np
import pytest

from fseg_jax.kmeans import kmeans
from fseg_jax.learning import learn_dictionary, relative_error


def tokens(n=3000, d=24, k_true=6, seed=0):
    """Non-negative tokens that are sparse non-negative mixtures of a few hidden parts, plus noise."""
    rng = np.random.default_rng(seed)
    parts = rng.uniform(0, 1, (k_true, d)) * (rng.random((k_true, d)) < 0.5)
    w = rng.exponential(1.0, (n, k_true)) * (rng.random((n, k_true)) < 0.4)
    return np.maximum(w @ parts + rng.normal(0, 0.02, (n, d)), 0).astype(np.float32)


def test_learned_bank_projects_better_than_kmeans_centres_on_held_out_tokens():
    x = tokens()
    train, held_out = x[:2400], x[2400:]
    centres = kmeans(train, 6, seed=0).centers
    learned = learn_dictionary(train, 6, steps=150, batch_tokens=512, seed=0)
    assert learned.concepts.shape == (6, 24) and (learned.concepts >= 0).all()
    assert np.any(learned.concepts > 0, axis=1).all()
    assert relative_error(held_out, learned.concepts) < 0.8 * relative_error(held_out, centres)
    assert learned.losses[-20:].mean() < learned.losses[:20].mean()


def test_one_seed_one_bank_and_a_resumed_run_finishes_the_same(tmp_path):
    x = tokens(n=800)
    full = learn_dictionary(x, 4, steps=30, batch_tokens=128, seed=3)
    again = learn_dictionary(x, 4, steps=30, batch_tokens=128, seed=3)
    np.testing.assert_array_equal(full.concepts, again.concepts)
    checkpoint = tmp_path / "learn.safetensors"
    first = learn_dictionary(x, 4, steps=12, batch_tokens=128, seed=3, checkpoint=checkpoint, checkpoint_every=5)
    assert first.steps == 12 and checkpoint.is_file()
    resumed = learn_dictionary(x, 4, steps=30, batch_tokens=128, seed=3, checkpoint=checkpoint)
    np.testing.assert_allclose(resumed.concepts, full.concepts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-5)
    with pytest.raises(ValueError, match="another run"):
        learn_dictionary(x, 5, steps=30, seed=3, checkpoint=checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["learn.safetensors"]


@pytest.mark.parametrize(
    "x, k, message",
    [
        (-np.ones((10, 3), np.float32), 2, "non-negative"),
        (np.full((10, 3), np.nan, np.float32), 2, "finite"),
        (np.ones((3, 3), np.float32), 5, "between 1 and the number of tokens"),
        (np.zeros((10, 3), np.float32), 2, "every token is zero"),
    ],
)
def test_bad_input_is_refused(x, k, message):
    with pytest.raises(ValueError, match=message):
        learn_dictionary(x, k, steps=2)


def test_learn_concepts_from_images_and_the_cli(tmp_path):
    from click.testing import CliRunner
    from PIL import Image
    from tiny_models import tiny_vit

    import fseg_jax
    from fseg_jax.cli import main
    from fseg_jax.hub import save_model

    model_dir = save_model(tiny_vit(), tmp_path / "model")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    bank = fseg_jax.learn_concepts(str(model_dir), images, ks=(3, 5), tile=32, steps=5, batch_tokens=32)
    assert bank.ks == (3, 5) and bank[5].shape == (5, 32) and (bank[5] >= 0).all()
    assert bank.model == str(model_dir.resolve()) and bank.layer == -1
    labels = fseg_jax.segment(images[0], bank, k=5)  # the bank finds its model again
    assert labels.shape == (64, 80)

    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"im{i}.png")
    out = tmp_path / "learned.safetensors"
    args = ["concepts", "learn", str(model_dir), *(str(tmp_path / f"im{i}.png") for i in range(3)), "--k", "4",
            "--tile", "32", "--steps", "4", "--batch-tokens", "32", "--checkpoint-dir", str(tmp_path / "ck"),
            "-o", str(out)]
    run = CliRunner().invoke(main, args)
    assert run.exit_code == 0, run.output
    assert fseg_jax.load_concepts(out).ks == (4,) and (tmp_path / "ck" / "k4.safetensors").is_file()
