"""fseg_jax.segment with the original notebook's CNN path: ResNet-50 layer3 features (stride 16, 1024 channels)
projected onto a bank, against the same steps done one by one with the public pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fseg_jax
from fseg_jax.features import padded_size, preprocess, token_features
from fseg_jax.io import read_image
from fseg_jax.upsample import upsample, upsample_argmax


@pytest.fixture(scope="module")
def resnet():
    return fseg_jax.ResNet50(rngs=nnx.Rngs(0))  # random weights: the steps, not the weights, are under test


def tissue_like(h, w, seed=0):
    """Smooth pink and purple blobs, uint8."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((h // 24 + 2, w // 24 + 2, 1), dtype=np.float32)
    mix = np.asarray(jax.image.resize(coarse, (h, w, 1), method="cubic"))
    img = mix * np.array([230, 150, 190]) + (1 - mix) * np.array([120, 60, 150]) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def assert_segment_is_project_of_the_features(model, image, concepts_kd):
    """segment() against preprocess -> token_features -> fseg_jax.project -> bilinear upsampling -> argmax."""
    h, w = image.shape[:2]
    res = fseg_jax.segment(image, concepts_kd, model=model, return_weights=True)
    hp, wp = padded_size(h, w, 16)
    k = len(concepts_kd)
    assert res.labels.shape == (h, w) and res.labels.dtype == np.int32
    assert res.weights.shape == (hp // 16, wp // 16, k)

    feats = token_features(model, preprocess(jnp.asarray(image[None]), model.config))[0]
    assert feats.shape == (hp // 16, wp // 16, 1024)
    w_direct = np.asarray(fseg_jax.project(np.asarray(feats).reshape(-1, 1024), concepts_kd).w).reshape(res.weights.shape)
    # the same solver on the same features, compiled in another program: equal up to float32 rounding
    error = np.abs(res.weights - w_direct).max()
    assert error <= 1e-4 * w_direct.max()
    labels = np.asarray(upsample_argmax(jnp.asarray(w_direct), (hp, wp)))[:h, :w]
    # labels agree wherever the direct weights' best concept leads by more than twice that rounding
    up = np.sort(np.asarray(upsample(jnp.asarray(w_direct), (hp, wp)))[:h, :w], axis=-1)
    clear = up[..., -1] - up[..., -2] > 2 * error
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(res.labels[clear], labels[clear])
    return res.labels


def test_resnet50_segment_with_a_random_bank(resnet):
    bank = np.abs(np.random.default_rng(0).standard_normal((12, 1024))).astype(np.float32)
    labels = assert_segment_is_project_of_the_features(resnet, tissue_like(100, 150), bank)
    assert len(np.unique(labels)) > 1


def test_resnet50_segment_with_the_upstream_resnet_bank(resnet, shared_data):
    bank = fseg_jax.import_joblib_concepts(shared_data / "concepts" / "resnet.joblib", trust_pickle=True)
    assert bank.ks[0] == 16 and bank[16].shape == (16, 1024)
    image = read_image(shared_data / "he" / "example_3.jpg")[300:540, 500:852]  # 240 x 352: 15 x 22 tokens
    assert_segment_is_project_of_the_features(resnet, image, bank[16])
