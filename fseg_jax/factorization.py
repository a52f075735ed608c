"""Non-negative least squares against a fixed concept bank, and full NMF, as jitted JAX programs.

Two problems, each with a public host-side entry point and a pure, traceable twin:

* ``project(x, concepts)`` / ``nnls(x_nd, c_kd)``: ``W = argmin_{W >= 0} ||X - W C||_F^2`` with the dictionary
  ``C`` (k, d) fixed. This is what F-Seg computes per token with scikit-learn's
  ``non_negative_factorization(X, H=C, update_H=False)``.
* ``factorize(x, k, seed=...)`` / ``nmf(x_nd, k, seed)``: ``X ~= W H`` with both factors free and
  non-negative, from scikit-learn's ``init="random"`` starting point (:func:`random_init`: the same numbers
  ``NMF(init="random", random_state=seed)`` starts from, so the same seed gives scikit-learn's factors).

An NNLS iteration works on ``G = C C^T`` (k, k) and ``B = X C^T`` (n, k), computed once per problem, so it
costs O(n k^2) and never touches the (n, d) features again; a full NMF iteration updates ``H`` as well and so
goes back to ``X`` every time, O(n k d). Each problem runs in its own
``lax.while_loop`` with its own stopping rule; leading batch dimensions are handled with ``jax.vmap``, so a
problem that converges early keeps its iterate while the rest of the batch continues.

Solvers (``solver=``):

``"admm"`` (default for ``project``)
    ADMM on ``W = Z, Z >= 0`` with over-relaxation 1.6 and the penalty ``rho = sqrt(l_min l_max)`` set from
    the spectrum of ``G``. The linear step ``(G + rho I)^{-1}`` is applied through one shared
    eigendecomposition of ``G``, i.e. two dense (n, k) x (k, k) products per iteration and no per-row work;
    the eigenbasis form keeps float32 round-off at the level of ``G`` itself even when ``cond(G)`` is 1e7,
    where an explicit inverse stalls at a ~30 times larger projected gradient. The projected gradient is
    checked every 10 iterations. Unlike coordinate descent each iteration is two matrix products, which is
    what accelerators are built for; its speed and accuracy against scikit-learn, and the alternatives
    measured and set aside, are in ``bench/README.md``.
``"hals"`` (default for ``factorize``)
    Exactly scikit-learn's ``solver="cd"``: W starts at zero, each iteration is one Gauss-Seidel sweep over
    the k columns, stopping when the summed projected-gradient violation of a sweep falls to ``tol`` times
    that of the first sweep. Same iterates, so the same iteration counts and labels as scikit-learn.
``"mu"``
    Lee & Seung multiplicative updates with scikit-learn's ``solver="mu"`` start (W = sqrt(mean(X) / k)) and
    stopping rule (relative decrease of the error, checked every 10 iterations). Slow on badly conditioned
    banks; provided for comparison.

Stopping. ``tol`` is relative to the start: for ``"admm"`` and ``"hals"`` the summed absolute projected
gradient must fall to ``tol`` times its value at ``W = 0`` (``"admm"``) or after the first sweep
(``"hals"``); for ``"mu"`` the error must decrease by less than ``tol`` of the initial error over 10
iterations. The default ``tol`` depends on the solver (``"admm"`` 1e-6, the others 1e-4 as scikit-learn):
the reference of ``"admm"`` is roughly k times larger, and at 1e-6 its objective is below that of
scikit-learn's coordinate descent at 1e-4. ``NNLSResult.converged`` is False when ``max_iter`` ran out first.

Precision. The solvers run in the dtype of the inputs after JAX's canonicalisation (float32 unless the
caller has enabled 64-bit mode and passes float64); matrix products request ``Precision.HIGHEST`` so that
GPUs do not fall back to TF32. The library never turns 64-bit mode on.

Input policy of ``project`` (``nnls`` assumes it has been applied): NaN in ``x`` becomes 0 (as in F-Seg);
negative or infinite ``x`` is an error unless ``clip_negative=True`` (negatives clipped to 0). Concepts go
through :func:`check_concepts`, which ``fseg_jax.segment`` uses as well: negatives are clipped to 0 in a
copy (with a ``UserWarning`` when below rounding level); all-zero concept rows, an empty bank, ``k > d``,
mismatched ``d``, non-finite values and non-floating dtypes raise ``ValueError``/``TypeError``.
Rows of ``x`` that are all zero get ``W = 0``. The caller's arrays are never modified.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from fseg_jax.compilation import jit
from fseg_jax.options import NMF_SOLVERS, SOLVERS, check_choice, check_int, check_optional_int, check_tol

__all__ = [
    "DEFAULT_SOLVER",
    "NMF_SOLVERS",
    "NNLSResult",
    "NMFResult",
    "SOLVERS",
    "check_concepts",
    "factorize",
    "nmf",
    "nmf_from",
    "nnls",
    "project",
    "random_init",
]

DEFAULT_SOLVER = "admm"
_DEFAULT_MAX_ITER = {"admm": 5000, "hals": 10000, "mu": 10000}
# "admm" measures its violation at the iterate against W = 0, a reference ~k times larger than the first
# coordinate-descent sweep that "hals" divides by; 1e-6 puts its objective below scikit-learn's at 1e-4.
_DEFAULT_TOL = {"admm": 1e-6, "hals": 1e-4, "mu": 1e-4}
_NMF_DEFAULT_MAX_ITER = 200
_NMF_DEFAULT_TOL = 1e-4

_HI = lax.Precision.HIGHEST
_ADMM_RELAX = 1.6  # over-relaxation
_ADMM_CHECK_EVERY = 10  # iterations between projected-gradient checks
_MU_CHECK_EVERY = 10  # as scikit-learn
_CONCEPT_WARN_RTOL = 1e-6  # negative concepts below -rtol * max(C) are reported, smaller ones are rounding


class NNLSResult(NamedTuple):
    """Result of ``project``/``nnls``. Leading batch dimensions of ``x`` carry over to every field.

    w: (..., n, k) non-negative weights. n_iter: (...,) int32 iterations run. objective: (...,)
    ``||X - W C||_F^2``. converged: (...,) bool, False when ``max_iter`` stopped the solver.
    """

    w: jax.Array
    n_iter: jax.Array
    objective: jax.Array
    converged: jax.Array


class NMFResult(NamedTuple):
    """Result of ``factorize``/``nmf``: w (..., n, k), h (..., k, d), n_iter, objective ``||X - W H||_F^2``, converged."""

    w: jax.Array
    h: jax.Array
    n_iter: jax.Array
    objective: jax.Array
    converged: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Pure building blocks (traceable, one problem, unbatched).


def _dot(a, b):
    return jnp.dot(a, b, precision=_HI)


def _violation(w, grad):
    """Summed absolute projected gradient of ``min_{w >= 0}`` at ``w``."""
    return jnp.sum(jnp.abs(jnp.where(w > 0, grad, jnp.minimum(grad, 0))))


def _hals_sweep(wt_kn, g_kk, bt_kn):
    """One Gauss-Seidel sweep over the k rows of ``wt`` (scikit-learn's ``_update_cdnmf_fast``).

    ``wt`` is W transposed (k, n), so that the coordinate block updated at step t is a contiguous row.
    Returns the new ``wt`` and the violation accumulated during the sweep.
    """
    k = wt_kn.shape[0]

    def column(t, carry):
        wt, viol = carry
        w_t = wt[t]
        grad = _dot(g_kk[t], wt) - bt_kn[t]
        pg = jnp.where(w_t == 0, jnp.minimum(grad, 0), grad)
        hess = g_kk[t, t]
        safe = jnp.where(hess != 0, hess, 1)
        new = jnp.where(hess != 0, jnp.maximum(w_t - grad / safe, 0), w_t)
        return wt.at[t].set(new), viol + jnp.sum(jnp.abs(pg))

    return lax.fori_loop(0, k, column, (wt_kn, jnp.zeros((), wt_kn.dtype)))


def _hals_stop(it, v, v0, tol, max_iter):
    """scikit-learn's rule: stop after the first sweep when it saw no violation, or when v / v0 <= tol."""
    converged = (v0 == 0) | (v <= tol * v0)
    return converged | (it >= max_iter), converged


def _nnls_hals(g_kk, b_nk, tol, max_iter):
    bt = b_nk.T

    def body(state):
        wt, it, v0, _, _ = state
        wt, v = _hals_sweep(wt, g_kk, bt)
        it = it + 1
        v0 = jnp.where(it == 1, v, v0)
        done, converged = _hals_stop(it, v, v0, tol, max_iter)
        return wt, it, v0, done, converged

    zero = jnp.zeros((), b_nk.dtype)
    init = (jnp.zeros_like(bt), jnp.int32(0), zero, jnp.bool_(False), jnp.bool_(False))
    wt, it, _, _, converged = lax.while_loop(lambda s: ~s[3], body, init)
    return wt.T, it, converged


def _nnls_admm(g_kk, b_nk, tol, max_iter):
    dtype = b_nk.dtype
    lam, v_kk = jnp.linalg.eigh(g_kk)
    lam = jnp.maximum(lam, 0)
    lmax = lam[-1]
    # The smallest eigenvalue of a float32 Gram matrix is only known to ~eps * lmax.
    lmin = jnp.maximum(lam[0], lmax * jnp.finfo(dtype).eps)
    rho = jnp.where(lmax > 0, jnp.sqrt(lmin * lmax), 1).astype(dtype)
    inv_k = 1 / (lam + rho)
    bh_nk = _dot(b_nk, v_kk)
    v0 = jnp.sum(jnp.maximum(b_nk, 0))  # violation at W = 0
    threshold = tol * v0
    alpha = jnp.asarray(_ADMM_RELAX, dtype)

    def step(_, carry):
        z, u = carry
        w = _dot((bh_nk + rho * _dot(z - u, v_kk)) * inv_k, v_kk.T)
        w = alpha * w + (1 - alpha) * z
        z_new = jnp.maximum(w + u, 0)
        return z_new, u + w - z_new

    def body(state):
        z, u, it, _, _ = state
        n_steps = jnp.minimum(_ADMM_CHECK_EVERY, max_iter - it)
        z, u = lax.fori_loop(0, n_steps, step, (z, u))
        it = it + n_steps
        converged = _violation(z, _dot(z, g_kk) - b_nk) <= threshold
        return z, u, it, converged | (it >= max_iter), converged

    zeros = jnp.zeros_like(b_nk)
    done0 = v0 == 0
    init = (zeros, zeros, jnp.int32(0), done0, done0)
    z, _, it, _, converged = lax.while_loop(lambda s: ~s[3], body, init)
    return z, it, converged


def _mu_update(w, numerator, denominator):
    eps = jnp.finfo(np.float32).eps  # scikit-learn's EPSILON, whatever the dtype
    denominator = jnp.where(denominator == 0, eps, denominator)
    return w * (numerator / denominator)


def _error_from_gram(xx, w_nk, g_kk, b_nk):
    """``||X - W C||_F`` from ``||X||^2``, G and B (the O(n k^2) form scikit-learn's 'mu' check needs)."""
    sq = xx + jnp.sum(w_nk * (_dot(w_nk, g_kk) - 2 * b_nk))
    return jnp.sqrt(jnp.maximum(sq, 0))


def _mu_loop(update, error, w0, tol, max_iter):
    """scikit-learn's 'mu' driver: ``update`` once per iteration, ``error`` checked every 10 iterations."""
    err0 = error(w0)

    def body(state):
        w, it, prev, _, _ = state
        n_steps = jnp.minimum(_MU_CHECK_EVERY, max_iter - it)
        w = lax.fori_loop(0, n_steps, lambda _, w: update(w), w)
        it = it + n_steps
        err = error(w)
        checked = (it % _MU_CHECK_EVERY) == 0
        converged = (tol > 0) & checked & ((prev - err) / err0 < tol)
        return w, it, err, converged | (it >= max_iter), converged

    # An exact start (X = 0 gives W = 0 and zero error) has nothing to improve; the relative decrease
    # would be 0 / 0 and never pass the test.
    done0 = err0 == 0
    init = (w0, jnp.int32(0), err0, done0, done0)
    w, it, _, _, converged = lax.while_loop(lambda s: ~s[3], body, init)
    return w, it, converged


def _nnls_mu(x_nd, g_kk, b_nk, tol, max_iter):
    k = g_kk.shape[0]
    xx = jnp.sum(x_nd * x_nd)
    w0 = jnp.full_like(b_nk, jnp.sqrt(jnp.mean(x_nd) / k))
    return _mu_loop(
        lambda w: _mu_update(w, b_nk, _dot(w, g_kk)),
        lambda w: _error_from_gram(xx, w, g_kk, b_nk),
        w0,
        tol,
        max_iter,
    )


def _objective(x_nd, w_nk, c_kd):
    r = x_nd - _dot(w_nk, c_kd)
    return jnp.sum(r * r)


# ----------------------------------------------------------------------------------------------------------------
# Pure, traceable entry points.


def nnls(
    x_nd: Float[ArrayLike, "n d"], c_kd: Float[ArrayLike, "k d"], *, solver=DEFAULT_SOLVER, tol=None,
    max_iter=None,
) -> NNLSResult:
    """``W = argmin_{W >= 0} ||X - W C||_F^2`` for one problem; pure and traceable (no input checks).

    Args:
      x_nd: (n, d) float features, finite and >= 0.
      c_kd: (k, d) float concepts, >= 0, no all-zero row.
      solver: "admm", "hals" or "mu" (static). See the module docstring.
      tol: relative stopping tolerance (may be traced); None picks the solver's default (admm 1e-6,
        hals and mu 1e-4, as scikit-learn).
      max_iter: iteration cap (static); None picks the solver's default (admm 5000, hals and mu 10000).

    Returns ``NNLSResult`` with w (n, k) in the working dtype, scalar n_iter, objective, converged. Safe
    to call under ``jax.jit`` and ``jax.vmap``; ``project`` is the checked, batched, jitted front end.
    """
    check_choice("solver", solver, SOLVERS)
    max_iter = check_optional_int("max_iter", max_iter) or _DEFAULT_MAX_ITER[solver]
    tol = _DEFAULT_TOL[solver] if tol is None else tol
    dtype = jnp.result_type(x_nd, c_kd, jnp.float32)
    x_nd = jnp.asarray(x_nd, dtype)
    c_kd = jnp.asarray(c_kd, dtype)
    tol = jnp.asarray(tol, dtype)
    g_kk = _dot(c_kd, c_kd.T)
    b_nk = _dot(x_nd, c_kd.T)
    if solver == "admm":
        w, it, converged = _nnls_admm(g_kk, b_nk, tol, max_iter)
    elif solver == "hals":
        w, it, converged = _nnls_hals(g_kk, b_nk, tol, max_iter)
    else:
        w, it, converged = _nnls_mu(x_nd, g_kk, b_nk, tol, max_iter)
    return NNLSResult(w, it, _objective(x_nd, w, c_kd), converged)


@lru_cache(maxsize=16)
def _sklearn_normals(seed: int, n: int, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The standard normals scikit-learn's ``init="random"`` draws for an (n, d) matrix, from
    ``RandomState(seed)``: H (k, d) first, then W (n, k). Read-only float32."""
    rng = np.random.RandomState(seed)
    normal_h = rng.standard_normal(size=(k, d)).astype(np.float32)
    normal_w = rng.standard_normal(size=(n, k)).astype(np.float32)
    normal_h.setflags(write=False)
    normal_w.setflags(write=False)
    return normal_w, normal_h


def random_init(x_nd: Float[ArrayLike, "n d"], k: int, seed: int) -> tuple[Float[Array, "n k"], Float[Array, "k d"]]:
    """scikit-learn's ``NMF(init="random", random_state=seed)`` start for X (n, d): W (n, k), H (k, d).

    |N(0, 1)| scaled by sqrt(mean(X) / k), the normals drawn on the host with ``RandomState(seed)`` exactly as
    scikit-learn draws them. ``k``, ``seed`` and the shape of ``x_nd`` are static (under ``jax.jit`` the normals
    are constants of the program); ``x_nd`` may be traced.
    """
    n, d = x_nd.shape
    normal_w, normal_h = _sklearn_normals(int(seed), int(n), int(k), int(d))
    avg = jnp.sqrt(jnp.mean(x_nd) / k)
    return avg * jnp.abs(jnp.asarray(normal_w, x_nd.dtype)), avg * jnp.abs(jnp.asarray(normal_h, x_nd.dtype))


def _nmf_hals(x_nd, w0, h0, tol, max_iter):
    def body(state):
        wt, h, it, v0, _, _ = state
        wt, vw = _hals_sweep(wt, _dot(h, h.T), _dot(h, x_nd.T))
        h, vh = _hals_sweep(h, _dot(wt, wt.T), _dot(wt, x_nd))
        v = vw + vh
        it = it + 1
        v0 = jnp.where(it == 1, v, v0)
        done, converged = _hals_stop(it, v, v0, tol, max_iter)
        return wt, h, it, v0, done, converged

    zero = jnp.zeros((), x_nd.dtype)
    init = (w0.T, h0, jnp.int32(0), zero, jnp.bool_(False), jnp.bool_(False))
    wt, h, it, _, _, converged = lax.while_loop(lambda s: ~s[4], body, init)
    return wt.T, h, it, converged


def _nmf_mu(x_nd, w0, h0, tol, max_iter):
    xx = jnp.sum(x_nd * x_nd)

    def update(wh):
        w, h = wh
        w = _mu_update(w, _dot(x_nd, h.T), _dot(w, _dot(h, h.T)))
        h = _mu_update(h, _dot(w.T, x_nd), _dot(_dot(w.T, w), h))
        return w, h

    def error(wh):
        w, h = wh
        return _error_from_gram(xx, w, _dot(h, h.T), _dot(x_nd, h.T))

    (w, h), it, converged = _mu_loop(update, error, (w0, h0), tol, max_iter)
    return w, h, it, converged


def nmf_from(
    x_nd: Float[ArrayLike, "n d"], w0_nk: Float[ArrayLike, "n k"], h0_kd: Float[ArrayLike, "k d"], *,
    solver="hals", tol=1e-4, max_iter=_NMF_DEFAULT_MAX_ITER,
) -> NMFResult:
    """Full NMF ``X ~= W H`` from a given start ``W0`` (n, k), ``H0`` (k, d) >= 0; one problem, pure, traceable.

    For callers with a start of their own; ``nmf`` starts from :func:`random_init`.
    """
    check_choice("solver", solver, NMF_SOLVERS)
    dtype = jnp.result_type(x_nd, jnp.float32)
    x_nd = jnp.asarray(x_nd, dtype)
    tol = jnp.asarray(tol, dtype)
    run = _nmf_hals if solver == "hals" else _nmf_mu
    w, h, it, converged = run(x_nd, jnp.asarray(w0_nk, dtype), jnp.asarray(h0_kd, dtype), tol, max_iter)
    return NMFResult(w, h, it, _objective(x_nd, w, h), converged)


def nmf(
    x_nd: Float[ArrayLike, "n d"], k: int, seed: int, *, solver="hals", tol=1e-4, max_iter=_NMF_DEFAULT_MAX_ITER,
) -> NMFResult:
    """Full NMF ``X ~= W H`` (W (n, k), H (k, d), both >= 0) for one problem; pure and traceable.

    Starts from :func:`random_init` (scikit-learn's ``init="random"`` with ``random_state=seed``); ``solver`` is
    "hals" (scikit-learn's "cd": alternating sweeps over W then H) or "mu". ``k``, ``seed``, ``solver`` and
    ``max_iter`` are static.
    """
    check_choice("solver", solver, NMF_SOLVERS)
    max_iter = check_optional_int("max_iter", max_iter) or _NMF_DEFAULT_MAX_ITER
    x_nd = jnp.asarray(x_nd, jnp.result_type(x_nd, jnp.float32))
    w0, h0 = random_init(x_nd, k, seed)
    return nmf_from(x_nd, w0, h0, solver=solver, tol=tol, max_iter=max_iter)


# ----------------------------------------------------------------------------------------------------------------
# Jitted, batched programs (one compilation per shape, dtype, solver and max_iter).


@jit(static_argnames=("solver", "max_iter"))
def _project_batched(x_bnd, c_kd, tol, *, solver, max_iter):
    return jax.vmap(lambda x: nnls(x, c_kd, solver=solver, tol=tol, max_iter=max_iter))(x_bnd)


@jit(static_argnames=("k", "seed", "solver", "max_iter"))
def _factorize_batched(x_bnd, tol, *, k, seed, solver, max_iter):
    return jax.vmap(lambda x: nmf(x, k, seed, solver=solver, tol=tol, max_iter=max_iter))(x_bnd)


# ----------------------------------------------------------------------------------------------------------------
# Public, checked entry points.


def _as_array(a, name):
    if not (hasattr(a, "dtype") and hasattr(a, "shape")):
        a = np.asarray(a)
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {a.dtype}; convert it, e.g. .astype(np.float32)")
    return a


def _prepare_x(x, clip_negative):
    """Check ``x`` (..., n, d) and apply the NaN / negative policy, on the device, without touching ``x``."""
    x = _as_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (n, d) or (..., n, d), got shape {tuple(x.shape)}")
    if 0 in x.shape:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): nothing to factorise")
    xj = jnp.asarray(x)
    if xj.dtype not in (jnp.float32, jnp.float64):
        xj = xj.astype(jnp.float32)
    xj = jnp.where(jnp.isnan(xj), 0, xj)  # a new array: NaN -> 0, as in F-Seg
    if not bool(jnp.all(jnp.isfinite(xj))):
        raise ValueError("x holds infinite values (only NaN is replaced, by 0); replace or drop them before the call")
    if bool(jnp.any(xj < 0)):
        if not clip_negative:
            raise ValueError(
                f"x holds negative values (min {float(jnp.min(xj)):.4g}); NMF needs x >= 0 "
                "(ReLU'd features); pass clip_negative=True to clip them to 0"
            )
        xj = jnp.maximum(xj, 0)
    return xj


def check_concepts(concepts: Float[ArrayLike, "k d"], d: int) -> Float[np.ndarray, "k d"]:
    """The (k, d) concept matrix every solver takes, checked once for ``project`` and ``fseg_jax.segment``.

    Refuses (ValueError / TypeError, one sentence): a non-floating dtype, a shape other than (k, d), an empty
    bank, a width other than ``d``, more concepts than dimensions, NaN or infinite values, and rows that are all
    zero (after clipping). Negatives are clipped to 0 (a ``UserWarning`` when beyond rounding level). Returns a
    new host array, float64 when the input is float64 and float32 otherwise; the input is never modified.
    """
    c = _as_array(concepts, "concepts")
    if c.ndim != 2:
        raise ValueError(f"concepts must have shape (k, d), got shape {tuple(c.shape)}")
    k, dc = c.shape
    if k == 0 or dc == 0:
        raise ValueError(f"concepts are empty (shape {tuple(c.shape)}); give at least one concept")
    if dc != d:
        raise ValueError(f"feature dimension mismatch: x has d={d}, concepts have d={dc}")
    if k > d:
        raise ValueError(f"k={k} concepts exceed the feature dimension d={d}; use at most d concepts")
    c = np.asarray(c)
    c = np.array(c, dtype=c.dtype if c.dtype in (np.float32, np.float64) else np.float32, copy=True)
    if not np.all(np.isfinite(c)):
        raise ValueError("concepts hold NaN or infinite values; the concept bank is damaged, load or build it again")
    cmin = float(c.min())
    if cmin < 0:
        if cmin < -_CONCEPT_WARN_RTOL * float(np.abs(c).max()):
            warnings.warn(
                f"concepts hold negative values (min {cmin:.4g}); they are clipped to 0 in a copy",
                UserWarning,
                stacklevel=3,
            )
        np.maximum(c, 0, out=c)
    zero_rows = np.flatnonzero(np.all(c == 0, axis=1))
    if zero_rows.size:
        raise ValueError(
            f"concept rows {zero_rows.tolist()} are all zero (after clipping negatives); drop them or rebuild the bank"
        )
    return c


def project(
    x: Float[ArrayLike, "*batch n d"],
    concepts: Float[ArrayLike, "k d"],
    *,
    solver: str = DEFAULT_SOLVER,
    tol: float | None = None,
    max_iter: int | None = None,
    clip_negative: bool = False,
) -> NNLSResult:
    """Non-negative weights of each row of ``x`` on a fixed concept bank: ``argmin_{W >= 0} ||X - W C||_F^2``.

    Args:
      x: features, (n, d) or (..., n, d), float (numpy or JAX). Each (n, d) slice is one problem with its
        own stopping rule. NaN becomes 0; negative values are an error unless ``clip_negative``.
      concepts: (k, d) float concept bank, k <= d, no all-zero row; negatives are clipped (copy + warning).
      solver: "admm" (default), "hals" (scikit-learn "cd", same iterates) or "mu".
      tol: relative stopping tolerance (see the module docstring); None picks the solver's default
        (admm 1e-6, hals and mu 1e-4).
      max_iter: iteration cap; None picks the solver's default.
      clip_negative: clip negative ``x`` to 0 instead of raising.

    Returns:
      ``NNLSResult(w, n_iter, objective, converged)``: w (..., n, k) float32 (float64 when 64-bit mode is on
      and the inputs are float64), n_iter / objective / converged with shape (...) (scalars for 2-D x).
    """
    check_choice("solver", solver, SOLVERS)
    max_iter = check_optional_int("max_iter", max_iter) or _DEFAULT_MAX_ITER[solver]
    tol = _DEFAULT_TOL[solver] if check_tol(tol) is None else float(tol)
    xj = _prepare_x(x, clip_negative)
    cj = jnp.asarray(check_concepts(concepts, xj.shape[-1]))
    lead, (n, d) = xj.shape[:-2], xj.shape[-2:]
    res = _project_batched(xj.reshape(-1, n, d), cj, tol, solver=solver, max_iter=max_iter)
    return NNLSResult(
        res.w.reshape(*lead, n, cj.shape[0]),
        res.n_iter.reshape(lead),
        res.objective.reshape(lead),
        res.converged.reshape(lead),
    )


def factorize(
    x: Float[ArrayLike, "*batch n d"],
    k: int,
    *,
    seed: int = 0,
    solver: str = "hals",
    tol: float | None = _NMF_DEFAULT_TOL,
    max_iter: int | None = _NMF_DEFAULT_MAX_ITER,
    clip_negative: bool = False,
) -> NMFResult:
    """Full NMF ``X ~= W H`` with k free components (F-Seg's per-image "deep feature factorisation").

    Args:
      x: (n, d) or (..., n, d) float features, same policy as ``project``.
      k: number of components, 1 <= k <= min(n, d).
      seed: the start is scikit-learn's ``init="random"`` with ``random_state=seed`` (:func:`random_init`), the
        same for every problem of a batch.
      solver: "hals" (scikit-learn "cd", alternating sweeps on W and H) or "mu".
      tol, max_iter: as scikit-learn's NMF (defaults 1e-4 and 200; None: the default).

    Returns ``NMFResult(w (..., n, k), h (..., k, d), n_iter, objective, converged)``.
    """
    check_choice("solver", solver, NMF_SOLVERS)
    max_iter = check_optional_int("max_iter", max_iter) or _NMF_DEFAULT_MAX_ITER
    tol = _NMF_DEFAULT_TOL if check_tol(tol) is None else float(tol)
    xj = _prepare_x(x, clip_negative)
    lead, (n, d) = xj.shape[:-2], xj.shape[-2:]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= min(n, d):
        raise ValueError(f"k must be an integer in [1, min(n, d)] = [1, {min(n, d)}], got {k!r}")
    seed = check_int("seed", seed, minimum=0)
    res = _factorize_batched(xj.reshape(-1, n, d), tol, k=int(k), seed=int(seed), solver=solver, max_iter=max_iter)
    return NMFResult(
        res.w.reshape(*lead, n, k),
        res.h.reshape(*lead, k, d),
        res.n_iter.reshape(lead),
        res.objective.reshape(lead),
        res.converged.reshape(lead),
    )
