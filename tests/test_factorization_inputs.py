"""Input policy of fseg_jax.factorization.project / factorize: NaN, negatives, shapes, dtypes; no mutation."""

from __future__ import annotations

import warnings

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import fseg_jax.factorization as factorization
from fseg_jax.factorization import factorize, project


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    c = rng.gamma(0.5, 1.0, size=(6, 40)).astype(np.float32)
    w = rng.exponential(1.0, size=(50, 6)) * (rng.random((50, 6)) < 0.4)
    x = np.maximum(w @ c + 0.05 * rng.standard_normal((50, 40)), 0).astype(np.float32)
    return x, c


def test_nan_becomes_zero_and_input_untouched(data):
    x, c = data
    x_nan = x.copy()
    x_nan[3, 5] = np.nan
    x_nan[7] = np.nan
    before = x_nan.copy()
    res = project(x_nan, c)
    np.testing.assert_array_equal(x_nan, before)  # NaNs still there
    zeroed = np.nan_to_num(x_nan, nan=0.0)
    np.testing.assert_allclose(np.asarray(res.w), np.asarray(project(zeroed, c).w), rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(res.w)[7] == 0)


def test_all_zero_rows_give_zero_weights(data):
    x, c = data
    x = x.copy()
    x[[0, 10]] = 0
    for solver in ("admm", "hals", "mu"):
        w = np.asarray(project(x, c, solver=solver).w)
        assert np.all(w[[0, 10]] == 0), solver
    for solver in ("admm", "hals", "mu"):  # an all-zero problem is solved at once, not run to max_iter
        res = project(np.zeros_like(x), c, solver=solver)
        assert np.all(np.asarray(res.w) == 0) and bool(res.converged), solver
        assert int(res.n_iter) <= 1, solver
    for solver in ("hals", "mu"):
        res = factorize(np.zeros_like(x), 3, solver=solver)
        assert bool(res.converged) and int(res.n_iter) <= 1, solver
        assert np.all(np.asarray(res.w) == 0) or np.all(np.asarray(res.h) == 0), solver


def test_negative_x_is_an_error_unless_clipped(data):
    x, c = data
    x_neg = x.copy()
    x_neg[1, 2] = -0.5
    with pytest.raises(ValueError, match="negative"):
        project(x_neg, c)
    res = project(x_neg, c, clip_negative=True)
    assert x_neg[1, 2] == -0.5
    np.testing.assert_allclose(np.asarray(res.w), np.asarray(project(np.maximum(x_neg, 0), c).w), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="negative"):
        factorize(x_neg, 3)


def test_infinite_x_is_an_error(data):
    x, c = data
    x_inf = x.copy()
    x_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        project(x_inf, c)


def test_negative_concepts_clipped_in_a_copy_with_warning(data):
    x, c = data
    c_neg = c.copy()
    c_neg[2, 3] = -0.3
    with pytest.warns(UserWarning, match="negative"):
        res = project(x, c_neg)
    assert c_neg[2, 3] == -0.3
    np.testing.assert_allclose(np.asarray(res.w), np.asarray(project(x, np.maximum(c_neg, 0)).w), rtol=1e-6, atol=1e-7)
    c_round = c.copy()
    c_round[2, 3] = -2e-8  # rounding-level negatives, as in the upstream banks: clipped silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        project(x, c_round)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda x, c: (x, np.vstack([c, np.zeros((1, 40), np.float32)])), ValueError, r"rows \[6\] are all zero"),
        (lambda x, c: (x[:, :5], c[:, :5]), ValueError, "exceed the feature dimension"),
        (lambda x, c: (x[:, :30], c), ValueError, "mismatch"),
        (lambda x, c: ((x * 100).astype(np.int64), c), TypeError, "floating"),
        (lambda x, c: (x, (c * 100).astype(np.int32)), TypeError, "floating"),
        (lambda x, c: (x[:0], c), ValueError, "empty"),
        (lambda x, c: (np.zeros((2, 0, 40), np.float32), c), ValueError, "empty"),
        (lambda x, c: (x[0], c), ValueError, "shape"),
        (lambda x, c: (x, c[None]), ValueError, "shape"),
        (lambda x, c: (x, np.where(c > 1, np.nan, c)), ValueError, "NaN"),
    ],
)
def test_invalid_inputs(data, make, error, match):
    x, c = make(*data)
    with pytest.raises(error, match=match):
        project(x, c)


def test_invalid_options(data):
    x, c = data
    with pytest.raises(ValueError, match="unknown solver"):
        project(x, c, solver="lbfgs")
    with pytest.raises(ValueError, match="max_iter"):
        project(x, c, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        project(x, c, tol=-1.0)
    with pytest.raises(ValueError, match="unknown solver"):
        factorize(x, 3, solver="admm")
    with pytest.raises(ValueError, match="k must be"):
        factorize(x, 41)
    with pytest.raises(TypeError, match="floating"):
        factorize(x.astype(np.int16), 3)
    for bad, match in (({"tol": float("nan")}, "tol must be"), ({"max_iter": 2.5}, "max_iter must be"),
                       ({"seed": -1}, "seed must be an integer >= 0"), ({"seed": True}, "seed must be")):
        with pytest.raises(ValueError, match=match):
            factorize(x, 3, **bad)


def test_factorize_none_means_the_default(data):
    """tol=None and max_iter=None mean the defaults, as for project."""
    x, _ = data
    given = factorize(x, 3, tol=None, max_iter=None)
    default = factorize(x, 3)
    np.testing.assert_array_equal(np.asarray(given.w), np.asarray(default.w))
    assert int(given.n_iter) == int(default.n_iter)
    assert int(factorize(x, 3, tol=0.0, max_iter=None).n_iter) == 200  # tol 0: runs to the default cap


def test_accepts_jax_arrays_lists_and_low_precision(data):
    x, c = data
    ref = np.asarray(project(x, c).w)
    np.testing.assert_allclose(np.asarray(project(jnp.asarray(x), jnp.asarray(c)).w), ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(project(x.astype(np.float64), c.astype(np.float64)).w), ref, rtol=1e-5, atol=1e-6)
    res16 = project(x.astype(np.float16), c)
    assert res16.w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(project(x.tolist(), c.tolist()).w), ref, rtol=1e-6, atol=1e-7)


def test_one_compilation_per_shape(data, monkeypatch):
    """project() traces its program (the pure ``nnls`` vmapped over the batch) once per shape: new values and a
    new tolerance reuse it. The shape (37 rows) is this test's own, so the first call here traces it."""
    x, c = data
    chex.clear_trace_counter()
    monkeypatch.setattr(factorization, "nnls", chex.assert_max_traces(factorization.nnls, n=1))
    chex.assert_shape(project(x[:37], c, tol=1e-5).w, (37, 6))
    chex.assert_shape(project(x[:37] * 2, c, tol=1e-6).w, (37, 6))  # same shapes: no new trace
    with pytest.raises(AssertionError, match="traced > 1 times"):  # the counter is live: a new shape traces
        project(x[:36], c)
