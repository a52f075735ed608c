"""fseg_jax.factorization against scikit-learn and an exact float64 optimum.

Every comparison runs on synthetic banks shaped like F-Seg's (``banks.concept_like_bank``: dense, badly
conditioned, near-duplicate concepts), so it runs in a fresh clone; the two claims about the real upstream banks
(../shared/data/concepts) have tests of their own, named ``..._on_the_upstream_banks``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import joblib
import numpy as np
import pytest
import scipy.linalg as scipy_linalg
import scipy.optimize as scipy_optimize
import sklearn.decomposition as sklearn_nmf
from banks import concept_like_bank

from fseg_jax.factorization import DEFAULT_SOLVER, factorize, nmf, nmf_from, nnls, project, random_init


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def upstream_banks(shared_data):
    # The upstream banks are pickles; these are the known files of the shared test data.
    banks = {}
    for name in ("uni", "prov_gigapath"):
        raw = joblib.load(shared_data / "concepts" / f"{name}.joblib")
        banks[name] = {k: np.clip(np.asarray(c, np.float64), 0, None) for k, c in raw.items()}
    return banks


@pytest.fixture(scope="module")
def banks():
    """Synthetic banks of the upstream sizes: d = 1024 (UNI's width) at k = 8, 16, 64, 256, d = 1536 at k = 256."""
    return {"d1024": {k: concept_like_bank(k, 1024) for k in (8, 16, 64, 256)},
            "d1536": {256: concept_like_bank(256, 1536, seed=1)}}


def synthetic_x(c_kd, n, *, seed=0, max_active=3, noise=0.3):
    """X = relu(W_true C + noise) with 1..max_active active concepts per row, float32."""
    rng = np.random.default_rng(seed)
    k, d = c_kd.shape
    w = np.zeros((n, k))
    for i in range(n):
        idx = rng.choice(k, size=rng.integers(1, max_active + 1), replace=False)
        w[i, idx] = rng.exponential(1.0, size=idx.size)
    x = w @ c_kd + noise * c_kd.mean() * rng.standard_normal((n, d))
    return np.maximum(x, 0).astype(np.float32)


def exact_nnls(x_nd, c_kd):
    """Row-wise Lawson-Hanson in float64 on the Gram form, certified by the KKT conditions."""
    x = np.asarray(x_nd, np.float64)
    c = np.asarray(c_kd, np.float64)
    g, b = c @ c.T, x @ c.T
    r = np.linalg.cholesky(g).T  # g = r^T r
    y = scipy_linalg.solve_triangular(r, b.T, trans="T").T
    w = np.stack([scipy_optimize.nnls(r, yi, maxiter=50 * c.shape[0])[0] for yi in y])
    grad = w @ g - b
    kkt = np.abs(np.where(w > 0, grad, np.minimum(grad, 0))).max()
    assert kkt <= 1e-9 * np.abs(b).max(), kkt
    return w


def objective(x, w, c):
    r = np.asarray(x, np.float64) - np.asarray(w, np.float64) @ np.asarray(c, np.float64)
    return float(np.sum(r * r))


def agreement(w_a, w_b):
    return float(np.mean(np.argmax(w_a, -1) == np.argmax(w_b, -1)))


def make_problems(banks, cases):
    """{(name, k): (x float32, c float32, exact optimum float64)} for n = 1000 rows per case."""
    out = {}
    for name, k in cases:
        c = banks[name][k]
        x = synthetic_x(c, 1000, seed=k)
        out[name, k] = (x, c.astype(np.float32), exact_nnls(x, c.astype(np.float32)))
    return out


SYNTHETIC_CASES = [("d1024", 8), ("d1024", 16), ("d1024", 64), ("d1024", 256), ("d1536", 256)]
UPSTREAM_CASES = [("uni", 8), ("uni", 16), ("uni", 64), ("uni", 256), ("prov_gigapath", 256)]


@pytest.fixture(scope="module")
def problems(banks):
    return make_problems(banks, SYNTHETIC_CASES)


@pytest.fixture(scope="module")
def upstream_problems(upstream_banks):
    return make_problems(upstream_banks, UPSTREAM_CASES)


# ------------------------------------------------------------------------------------------------ project


def assert_reaches_optimum(problem):
    x, c, w_opt = problem
    res = project(x, c)
    assert bool(res.converged)
    w = np.asarray(res.w)
    assert w.shape == w_opt.shape and w.dtype == np.float32 and (w >= 0).all()
    f_opt = objective(x, w_opt, c)
    assert objective(x, w, c) <= f_opt * (1 + 1e-4)
    assert agreement(w, w_opt) >= 0.999
    np.testing.assert_allclose(float(res.objective), objective(x, w, c), rtol=1e-4)


@pytest.mark.parametrize("case", SYNTHETIC_CASES)
def test_default_solver_reaches_optimum(problems, case):
    assert_reaches_optimum(problems[case])


@pytest.mark.parametrize("case", UPSTREAM_CASES)
def test_default_solver_reaches_optimum_on_the_upstream_banks(upstream_problems, case):
    assert_reaches_optimum(upstream_problems[case])


@pytest.mark.parametrize(
    ("solver", "case", "tol", "max_iter"),
    [
        ("admm", ("d1024", 64), 1e-8, None),
        ("hals", ("d1024", 16), 1e-7, None),
        ("hals", ("d1024", 64), 1e-7, None),
        ("mu", ("d1024", 8), 0.0, 20000),
    ],
)
def test_every_solver_converges_to_optimum(problems, solver, case, tol, max_iter):
    x, c, w_opt = problems[case]
    w = np.asarray(project(x, c, solver=solver, tol=tol, max_iter=max_iter).w)
    assert objective(x, w, c) <= objective(x, w_opt, c) * (1 + 1e-4)


def assert_hals_reproduces_sklearn_cd(c, n, seed):
    x = synthetic_x(c.astype(np.float64), n, seed=seed)
    w_skl, _, it_skl = sklearn_nmf.non_negative_factorization(x, H=c, update_H=False, max_iter=10000)
    res = project(x, c, solver="hals", tol=1e-4, max_iter=10000)
    # the same sweeps in the same order and the same stopping rule: only float32 rounding differs (the order of
    # the sums in the Gram products), measured at <= 1e-4 of the largest weight after hundreds of sweeps
    assert int(res.n_iter) == it_skl
    w = np.asarray(res.w)
    atol = 2e-4 * w_skl.max()
    np.testing.assert_allclose(w, w_skl, atol=atol)
    # so the argmax is the same wherever scikit-learn's best concept leads the runner-up by more than that
    top2 = np.sort(w_skl, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(w[clear].argmax(-1), w_skl[clear].argmax(-1))


@pytest.mark.parametrize(("k", "n"), [(8, 1000), (16, 1000), (64, 500), (256, 48)])
def test_hals_reproduces_sklearn_cd(banks, k, n):
    assert_hals_reproduces_sklearn_cd(banks["d1024"][k].astype(np.float32), n, seed=100 + k)


@pytest.mark.parametrize(("k", "n"), [(8, 1000), (16, 1000), (64, 500), (256, 48)])
def test_hals_reproduces_sklearn_cd_on_the_upstream_banks(upstream_banks, k, n):
    assert_hals_reproduces_sklearn_cd(upstream_banks["uni"][k].astype(np.float32), n, seed=100 + k)


def test_well_spread_bank():
    """A random, well-spread bank (unlike F-Seg's) with sparse ground truth: the default finds it."""
    rng = np.random.default_rng(7)
    c = rng.gamma(0.5, 1.0, size=(32, 256))
    x = synthetic_x(c, 600, seed=8, noise=0.1)
    w_opt = exact_nnls(x, c.astype(np.float32))
    w = np.asarray(project(x, c.astype(np.float32)).w)
    assert objective(x, w, c) <= objective(x, w_opt, c) * (1 + 1e-4)
    assert agreement(w, w_opt) >= 0.999


def test_batched_equals_loop_and_stops_early(banks):
    c = banks["d1024"][16].astype(np.float32)
    hard = synthetic_x(c.astype(np.float64), 300, seed=1)
    easy = np.tile(c[:1], (300, 1)) * 2.0  # every row is exactly one concept
    other = synthetic_x(c.astype(np.float64), 300, seed=2, noise=0.05)
    xb = np.stack([hard, easy, other])
    for solver in ("admm", "hals"):
        batched = project(xb, c, solver=solver)
        assert batched.w.shape == (3, 300, 16) and batched.n_iter.shape == (3,)
        for i in range(3):
            single = project(xb[i], c, solver=solver)
            np.testing.assert_allclose(np.asarray(batched.w[i]), np.asarray(single.w), rtol=1e-5, atol=1e-6)
            assert int(batched.n_iter[i]) == int(single.n_iter)
            np.testing.assert_allclose(float(batched.objective[i]), float(single.objective), rtol=1e-5)
        assert int(batched.n_iter[1]) < int(batched.n_iter[0])
        assert bool(batched.converged.all())
    # leading dimensions beyond one batch axis
    four_d = project(xb.reshape(3, 1, 300, 256 * 4), c, solver="admm")
    assert four_d.w.shape == (3, 1, 300, 16) and four_d.n_iter.shape == (3, 1)


def test_pure_twin_under_jit_and_vmap(banks):
    c = banks["d1024"][8].astype(np.float32)
    x = synthetic_x(c.astype(np.float64), 200, seed=3)
    ref = project(x, c)
    jitted = jax.jit(lambda x, c: nnls(jnp.sqrt(x * x), c, solver=DEFAULT_SOLVER).w)(x, c)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(ref.w), rtol=1e-5, atol=1e-6)
    vm = jax.jit(jax.vmap(lambda x: nnls(x, c, solver="hals", tol=1e-4)))(np.stack([x, x]))
    assert vm.w.shape == (2, 200, 8) and int(vm.n_iter[0]) == int(vm.n_iter[1])


# ------------------------------------------------------------------------------------------------ factorize


@pytest.mark.filterwarnings("ignore:Maximum number of iterations")
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_nmf_matches_sklearn_from_same_start(banks, solver):
    """From one start (``random_init``: scikit-learn's own random start, test_api checks), our iterates follow
    scikit-learn's NMF."""
    c = banks["d1024"][8]
    x = synthetic_x(c, 400, seed=5)
    k = 6
    w0, h0 = (np.asarray(a) for a in random_init(jnp.asarray(x), k, 0))
    model = sklearn_nmf.NMF(k, init="custom", solver="cd" if solver == "hals" else "mu", tol=1e-4, max_iter=200)
    w_skl = model.fit_transform(x, W=w0.copy(), H=h0.copy())
    f_skl = objective(x, w_skl, model.components_)
    res = jax.jit(lambda x, w, h: nmf_from(x, w, h, solver=solver, tol=1e-4, max_iter=200))(x, w0, h0)
    assert int(res.n_iter) == model.n_iter_
    # the same updates in float32, rounded in another order: measured 1e-5 of the largest entry after 200
    # iterations, 1e-7 on the objective
    np.testing.assert_allclose(np.asarray(res.w), w_skl, atol=1e-4 * w_skl.max())
    np.testing.assert_allclose(np.asarray(res.h), model.components_, atol=1e-4 * model.components_.max())
    f = objective(x, res.w, res.h)
    assert f == pytest.approx(f_skl, rel=1e-6)
    np.testing.assert_allclose(float(res.objective), f, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Maximum number of iterations")
@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_factorize_reaches_sklearn_objective(banks, solver):
    c = banks["d1024"][8]
    x = synthetic_x(c, 400, seed=6)
    k = 6
    model = sklearn_nmf.NMF(k, init="random", random_state=0, solver="cd" if solver == "hals" else "mu", max_iter=1000)
    w_skl = model.fit_transform(x)
    f_skl = objective(x, w_skl, model.components_)
    res = factorize(x, k, seed=0, solver=solver, max_iter=1000)
    assert res.w.shape == (400, k) and res.h.shape == (k, 256 * 4)
    assert (np.asarray(res.w) >= 0).all() and (np.asarray(res.h) >= 0).all()
    assert objective(x, res.w, res.h) <= 1.02 * f_skl


def test_factorize_batched_and_pure_twin(banks):
    c = banks["d1024"][8]
    xb = np.stack([synthetic_x(c, 200, seed=s) for s in (1, 2)])
    res = factorize(xb, 4, seed=3)
    assert res.w.shape == (2, 200, 4) and res.h.shape == (2, 4, 1024) and res.n_iter.shape == (2,)
    for i in range(2):
        single = jax.jit(lambda x: nmf(x, 4, 3))(xb[i])
        np.testing.assert_allclose(np.asarray(res.w[i]), np.asarray(single.w), rtol=1e-4, atol=1e-5)
        assert int(res.n_iter[i]) == int(single.n_iter)
