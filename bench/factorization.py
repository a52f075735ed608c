"""Benchmark fseg_jax.factorization.project against scikit-learn's coordinate descent with F-Seg's settings.

Same run, same inputs: X = relu(W_true C + noise) (sparse W_true, float32) on the upstream concept banks
(d = 1024: UNI, d = 1536: Prov-GigaPath, from ../shared/data/concepts), scikit-learn
``non_negative_factorization(X, H=C, update_H=False, max_iter=10000)`` (solver "cd", tol 1e-4) against each
solver compiled and warm. Printed per case: time and speed-up over scikit-learn, objective over scikit-learn's,
objective excess over the exact optimum and argmax agreement with it (float64 Lawson-Hanson per row, on up to
--opt-rows rows).

    python bench/factorization.py --quick
    python bench/factorization.py --n 4880 --k 64 --d 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np
from _common import SHARED_DATA, best_time, host_description

from fseg_jax.factorization import DEFAULT_SOLVER, SOLVERS, project

BANK_FOR_D = {1024: "uni", 1536: "prov_gigapath"}


def load_bank(folder, d, k):
    import joblib  # the upstream banks are pickles; only the known shared files are read

    return np.clip(np.asarray(joblib.load(Path(folder) / f"{BANK_FOR_D[d]}.joblib")[k], np.float32), 0, None)


def synthetic_x(c_kd, n, seed=0, max_active=3, noise=0.3):
    """X = relu(W_true C + noise), float32, W_true with up to ``max_active`` concepts per row (each slot kept with
    probability 1, 0.6, 0.3), drawn at once for all rows: vectorised for n up to 65536. tests/test_factorization.py keeps
    its own row-by-row generator (exactly 1..3 distinct concepts per row, for small certified problems): the
    tests do not import from bench/, and the two serve different problem sizes."""
    rng = np.random.default_rng(seed)
    k, d = c_kd.shape
    w = np.zeros((n, k), np.float32)
    rows = np.repeat(np.arange(n), max_active)
    cols = rng.integers(0, k, size=n * max_active)
    keep = rng.random(n * max_active) < np.tile([1.0, 0.6, 0.3], n)[: n * max_active]
    w[rows[keep], cols[keep]] = rng.exponential(1.0, size=keep.sum())
    x = w @ c_kd + noise * c_kd.mean() * rng.standard_normal((n, d)).astype(np.float32)
    return np.maximum(x, 0)


def exact_nnls(x_nd, c_kd):
    import scipy.linalg
    import scipy.optimize

    c = c_kd.astype(np.float64)
    g, b = c @ c.T, x_nd.astype(np.float64) @ c.T
    r = np.linalg.cholesky(g).T
    y = scipy.linalg.solve_triangular(r, b.T, trans="T").T
    return np.stack([scipy.optimize.nnls(r, yi, maxiter=50 * c.shape[0])[0] for yi in y])


def objective(x, w, c):
    r = x.astype(np.float64) - np.asarray(w, np.float64) @ c.astype(np.float64)
    return float(np.sum(r * r))


def run_case(n, k, d, solvers, args):
    c = load_bank(args.concepts_dir, d, k)
    x = synthetic_x(c, n, seed=n + k + d)
    rows = np.random.default_rng(0).choice(n, size=min(n, args.opt_rows), replace=False)
    w_opt = exact_nnls(x[rows], c)
    f_opt = objective(x[rows], w_opt, c)
    label = f"n={n:6d} k={k:3d} d={d}"
    results = {}

    t_skl = f_skl = None
    if args.sklearn and n * k * k <= args.sklearn_max_work:
        from sklearn.decomposition import non_negative_factorization

        t0 = time.perf_counter()
        w_skl, _, it = non_negative_factorization(x, H=c, update_H=False, max_iter=10000)
        t_skl = time.perf_counter() - t0
        f_skl = objective(x, w_skl, c)
        results["sklearn-cd"] = (t_skl, it, w_skl, f_skl)
    for solver in solvers:
        project(x, c, solver=solver)  # compile
        t, res = best_time(lambda s=solver: jax.block_until_ready(project(x, c, solver=s)), args.repeats)
        w = np.asarray(res.w)
        results[solver] = (t, int(res.n_iter), w, objective(x, w, c))

    for name, (t, it, w, f) in results.items():
        speed = f"{t_skl / t:8.1f}x" if t_skl else "       -"
        fr = f"{f / f_skl:.6f}" if f_skl else "       -"
        excess = objective(x[rows], w[rows], c) / f_opt - 1
        agree = np.mean(np.argmax(w[rows], 1) == np.argmax(w_opt, 1))
        print(
            f"{label} {name:>10s}: {t:8.3f} s {it:6d} it  speed-up {speed}  obj/skl {fr}  "
            f"obj/opt-1 {excess:9.2e}  argmax agree {100 * agree:7.3f}%",
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="n=4880, k in {16, 64}, d=1024 (the F-Seg example image)")
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4880, 65536])
    p.add_argument("--k", type=int, nargs="+", default=[8, 16, 64, 256])
    p.add_argument("--d", type=int, nargs="+", default=[1024, 1536], choices=sorted(BANK_FOR_D))
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument("--no-sklearn", dest="sklearn", action="store_false")
    p.add_argument(
        "--sklearn-max-work",
        type=float,
        default=2e9,
        help="skip scikit-learn where n * k^2 exceeds this (its sweeps cost n k^2 and run ~1000 times at k=256)",
    )
    p.add_argument("--opt-rows", type=int, default=2048, help="rows on which the exact optimum is computed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concepts-dir", default=str(SHARED_DATA / "concepts"),
                   help="folder holding uni.joblib and prov_gigapath.joblib")
    args = p.parse_args()
    if args.quick:
        args.n, args.k, args.d = [4880], [16, 64], [1024]
    print(host_description())
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; default solver {DEFAULT_SOLVER!r}")
    for d in args.d:
        for k in args.k:
            for n in args.n:
                run_case(n, k, d, args.solvers, args)


if __name__ == "__main__":
    main()
