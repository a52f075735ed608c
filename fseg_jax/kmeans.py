"""k-means in JAX: k-means++ seeding and jitted Lloyd iterations that stream over fixed-size chunks of the data.

`kmeans(x_nd, k, seed=...)` is the public, host-validating entry point (concept banks are built with it).
The data sit on the device once, as (n_chunks, chunk, d); every pass over them is a `lax.scan` over the
chunks, so the largest temporary is a (chunk, k) distance block, never (n, k). Results are deterministic
for a seed on a given platform.

The algorithm follows scikit-learn's `KMeans(algorithm="lloyd", init="k-means++")`: greedy k-means++ with
`2 + floor(log k)` candidates per centre, Lloyd iterations until the squared centre shift falls to
`tol * mean(var(x, axis=0))`, empty clusters moved to the points farthest from their centres, and the best
of `n_init` runs by inertia (sum of squared distances to the nearest centre).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fseg_jax.compilation import jit

_HIGHEST = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
    """centers: (k, d) float32; inertia: sum of squared distances to the nearest centre; n_iter: Lloyd
    iterations run (of the best init); converged: whether that run met `tol` before `max_iter`."""

    centers: np.ndarray
    inertia: float
    n_iter: int
    converged: bool


def _sq_dists(x_cd: jax.Array, c_kd: jax.Array, c_sq_k: jax.Array) -> jax.Array:
    """(c, k) squared Euclidean distances, clipped at 0 against cancellation."""
    x_sq_c = jnp.sum(x_cd * x_cd, axis=1)
    cross_ck = jnp.dot(x_cd, c_kd.T, precision=_HIGHEST)
    return jnp.maximum(x_sq_c[:, None] - 2.0 * cross_ck + c_sq_k[None, :], 0.0)


def _assign(x_bcd: jax.Array, valid_bc: jax.Array, c_kd: jax.Array):
    """One streamed pass: per-cluster sums (k, d), counts (k,), inertia, and per-point min distances (b, c)."""
    k, d = c_kd.shape
    c_sq_k = jnp.sum(c_kd * c_kd, axis=1)

    def step(carry, chunk):
        sums_kd, counts_k, inertia = carry
        x_cd, valid_c = chunk
        dist_ck = _sq_dists(x_cd, c_kd, c_sq_k)
        label_c = jnp.argmin(dist_ck, axis=1)
        min_c = jnp.where(valid_c, jnp.min(dist_ck, axis=1), 0.0)
        onehot_ck = ((label_c[:, None] == jnp.arange(k)[None, :]) & valid_c[:, None]).astype(x_cd.dtype)
        sums_kd = sums_kd + jnp.dot(onehot_ck.T, x_cd, precision=_HIGHEST)
        counts_k = counts_k + jnp.sum(onehot_ck, axis=0)
        return (sums_kd, counts_k, inertia + jnp.sum(min_c)), min_c

    init = (jnp.zeros((k, d), x_bcd.dtype), jnp.zeros((k,), x_bcd.dtype), jnp.zeros((), x_bcd.dtype))
    (sums_kd, counts_k, inertia), min_bc = jax.lax.scan(step, init, (x_bcd, valid_bc))
    return sums_kd, counts_k, inertia, min_bc


def kmeans_plusplus(x_nd: jax.Array, n_valid: jax.Array, k: int, key: jax.Array) -> jax.Array:
    """Greedy k-means++ seeding (as scikit-learn): returns (k, d) initial centres.

    x_nd: (n, d) float32 where only the first `n_valid` rows are data (the rest is padding). Pure and jit-able
    (`k` static). Memory: (n, 2 + log k) for the candidate distances.
    """
    n, d = x_nd.shape
    n_local = 2 + int(math.log(k))
    valid_n = jnp.arange(n) < n_valid
    key, sub = jax.random.split(key)
    first = jax.random.randint(sub, (), 0, n_valid)
    centers_kd = jnp.zeros((k, d), x_nd.dtype).at[0].set(x_nd[first])
    x_sq_n = jnp.sum(x_nd * x_nd, axis=1)

    def cand_dists(cand_ld):
        cross_nl = jnp.dot(x_nd, cand_ld.T, precision=_HIGHEST)
        return jnp.maximum(x_sq_n[:, None] - 2.0 * cross_nl + jnp.sum(cand_ld * cand_ld, axis=1)[None, :], 0.0)

    min_n = jnp.where(valid_n, cand_dists(x_nd[first][None, :])[:, 0], 0.0)

    def body(i, carry):
        centers_kd, min_n, key = carry
        key, sub = jax.random.split(key)
        cum_n = jnp.cumsum(min_n)
        targets_l = jax.random.uniform(sub, (n_local,)) * cum_n[-1]
        cand_l = jnp.clip(jnp.searchsorted(cum_n, targets_l, side="right"), 0, n_valid - 1)
        cand_ld = x_nd[cand_l]
        new_nl = jnp.where(valid_n[:, None], jnp.minimum(min_n[:, None], cand_dists(cand_ld)), 0.0)
        best = jnp.argmin(jnp.sum(new_nl, axis=0))
        return centers_kd.at[i].set(cand_ld[best]), new_nl[:, best], key

    centers_kd, _, _ = jax.lax.fori_loop(1, k, body, (centers_kd, min_n, key))
    return centers_kd


@jit(static_argnames=("k", "max_iter"))
def _kmeans_single(x_bcd, n_valid, key, tol_abs, *, k: int, max_iter: int):
    b, c, d = x_bcd.shape
    x_nd = x_bcd.reshape(b * c, d)
    valid_bc = (jnp.arange(b * c) < n_valid).reshape(b, c)
    centers_kd = kmeans_plusplus(x_nd, n_valid, k, key)

    def cond(state):
        _, i, shift = state
        return (i < max_iter) & (shift > tol_abs)

    def body(state):
        centers_kd, i, _ = state
        sums_kd, counts_k, _, min_bc = _assign(x_bcd, valid_bc, centers_kd)
        new_kd = jnp.where(counts_k[:, None] > 0, sums_kd / jnp.maximum(counts_k, 1.0)[:, None], centers_kd)
        # Empty clusters take the points farthest from their centres, farthest first.
        empty_k = counts_k == 0
        _, far_k = jax.lax.top_k(min_bc.reshape(-1), k)
        rank_k = jnp.cumsum(empty_k) - 1
        new_kd = jnp.where(empty_k[:, None], x_nd[far_k[jnp.clip(rank_k, 0, k - 1)]], new_kd)
        shift = jnp.sum((new_kd - centers_kd) ** 2)
        return new_kd, i + 1, shift

    centers_kd, n_iter, shift = jax.lax.while_loop(cond, body, (centers_kd, jnp.int32(0), jnp.float32(jnp.inf)))
    _, _, inertia, _ = _assign(x_bcd, valid_bc, centers_kd)
    return centers_kd, inertia, n_iter, shift <= tol_abs


def kmeans(
    x_nd,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
    tol: float = 1e-4,
    chunk_size: int = 4096,
) -> KMeansResult:
    """Cluster the rows of `x_nd` ((n, d), any real dtype, computed in float32) into `k` clusters.

    Returns the best of `n_init` k-means++-seeded Lloyd runs (keys derived from `seed`). `tol` is relative to
    the mean per-feature variance of the data, as in scikit-learn. `chunk_size` bounds the (chunk, k)
    distance block held at once. Raises ValueError for non-2-D or non-finite data, k < 1 or k > n.
    """
    x = np.asarray(x_nd)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"k-means expects a non-empty 2-D array (n, d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"k-means expects real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError("k-means input contains NaN or infinite values")
    n, d = x.shape
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be between 1 and the number of samples ({n}), got {k}")
    if n_init < 1 or max_iter < 1 or chunk_size < 1:
        raise ValueError(f"n_init, max_iter and chunk_size must be >= 1, got {n_init}, {max_iter}, {chunk_size}")
    k = int(k)

    chunk = min(int(chunk_size), -(-n // 8) * 8)
    n_chunks = -(-n // chunk)
    x_pad = np.zeros((n_chunks * chunk, d), np.float32)
    x_pad[:n] = x
    x_bcd = jnp.asarray(x_pad.reshape(n_chunks, chunk, d))
    tol_abs = jnp.float32(tol * float(np.mean(np.var(x, axis=0, dtype=np.float64))))

    best = None
    for key in jax.random.split(jax.random.key(seed), n_init):
        centers_kd, inertia, n_iter, converged = _kmeans_single(
            x_bcd, jnp.int32(n), key, tol_abs, k=k, max_iter=int(max_iter)
        )
        inertia = float(inertia)
        if best is None or inertia < best.inertia:
            best = KMeansResult(np.asarray(centers_kd), inertia, int(n_iter), bool(converged))
    return best
