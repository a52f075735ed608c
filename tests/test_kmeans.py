"""k-means in JAX against scikit-learn's KMeans (inertia), plus determinism, streaming and bad inputs."""

from __future__ import annotations

import jax
import joblib
import numpy as np
import pytest
from banks import concept_like_bank
from sklearn.cluster import KMeans

from fseg_jax.kmeans import kmeans, kmeans_plusplus


def _blobs(n=2000, d=16, centres=20, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0, (centres, d))
    return (means[rng.integers(0, centres, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _bank_like(bank_kd, n=1500, d=128, seed=0):
    """ReLU'd noisy copies of concept centres (their first d features): the kind of data banks are built from."""
    bank = np.asarray(bank_kd, np.float32)[:, :d]
    rng = np.random.default_rng(seed)
    x = bank[rng.integers(0, len(bank), n)] + rng.normal(0.0, 0.3, (n, d)).astype(np.float32)
    return np.maximum(x, 0.0)


def assert_matches_sklearn(x, k):
    ref = KMeans(k, n_init=10, random_state=0).fit(x).inertia_
    ours = kmeans(x, k, seed=0)
    assert ours.inertia <= 1.02 * ref, (ours.inertia, ref)
    # the reported inertia is that of the returned centres
    d2 = ((x[:, None, :] - ours.centers[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(ours.inertia, d2.sum(), rtol=1e-4)


@pytest.mark.parametrize("k", [8, 32])
def test_inertia_matches_sklearn_on_blobs(k):
    x = _blobs()
    ref = KMeans(k, n_init=10, random_state=0).fit(x).inertia_
    ours = kmeans(x, k, seed=0)
    assert ours.converged
    assert ours.inertia <= 1.02 * ref, (ours.inertia, ref)


@pytest.mark.parametrize("k", [16, 64])
def test_inertia_matches_sklearn_on_concept_like_data(k):
    assert_matches_sklearn(_bank_like(concept_like_bank(256)), k)


@pytest.mark.parametrize("k", [16, 64])
def test_inertia_matches_sklearn_on_the_upstream_bank(shared_data, k):
    assert_matches_sklearn(_bank_like(joblib.load(shared_data / "concepts" / "uni.joblib")[256]), k)


def test_deterministic_for_a_seed():
    x = _blobs(n=700, d=8)
    a = kmeans(x, 12, seed=3)
    b = kmeans(x, 12, seed=3)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert a.inertia == b.inertia and a.n_iter == b.n_iter
    c = kmeans(x, 12, seed=4)
    assert not np.array_equal(a.centers, c.centers)


def test_streaming_chunks_give_the_same_clustering():
    x = _blobs(n=1003, d=8)  # not a multiple of the chunk: the last chunk is padded and masked
    whole = kmeans(x, 10, seed=1, n_init=1)
    chunked = kmeans(x, 10, seed=1, n_init=1, chunk_size=64)
    np.testing.assert_allclose(chunked.centers, whole.centers, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(chunked.inertia, whole.inertia, rtol=1e-5)


def test_exact_cases_and_empty_clusters():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(5, 3)).astype(np.float32)
    # k == n: every point is its own centre
    r = kmeans(pts, 5, seed=0)
    assert r.inertia == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(np.sort(r.centers, axis=0), np.sort(pts, axis=0), atol=1e-5)
    # more clusters than distinct points: empty clusters are refilled, the result stays exact and finite
    dup = np.repeat(pts[:3], 10, axis=0)
    r = kmeans(dup, 4, seed=0)
    assert np.isfinite(r.centers).all() and r.inertia == pytest.approx(0.0, abs=1e-5)


def test_plusplus_picks_data_points():
    x = _blobs(n=300, d=4)
    c = np.asarray(kmeans_plusplus(jax.numpy.asarray(x), 300, 7, jax.random.key(0)))
    assert all(np.any(np.all(np.isclose(x, row), axis=1)) for row in c)
    assert len({tuple(row) for row in c}) == 7


def test_input_not_mutated_and_bad_inputs():
    x = _blobs(n=100, d=4)
    before = x.copy()
    kmeans(x, 3)
    np.testing.assert_array_equal(x, before)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(bad, 3)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(x[:, 0], 3)
    with pytest.raises(ValueError, match="between 1 and the number of samples"):
        kmeans(x, 101)
    with pytest.raises(ValueError, match="between 1"):
        kmeans(x, 0)
