"""fseg_jax.evaluate against a plain numpy/scipy loop doing the same scoring, same run, same label maps.

    python bench/evaluate.py                      # 3000 maps of 256x256, 16 concepts, 6 classes
    python bench/evaluate.py --maps 500 --size 512

The reference accumulates the confusion matrix pixel by pixel (``np.add.at``), matches with
``scipy.optimize.linear_sum_assignment`` and computes each class's IoU from boolean masks of the mapped labels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from fseg_jax import evaluate


def reference(preds, targets, k, c):
    confusion = np.zeros((k, c), np.int64)
    for p, t in zip(preds, targets):
        np.add.at(confusion, (p.ravel(), t.ravel()), 1)
    rows, cols = linear_sum_assignment(-confusion)
    mapping = np.full(k, -1)
    mapping[rows] = cols
    inter, union = np.zeros(c), np.zeros(c)
    for p, t in zip(preds, targets):
        mapped = mapping[p]
        for cls in range(c):
            inter[cls] += np.sum((mapped == cls) & (t == cls))
            union[cls] += np.sum((mapped == cls) | (t == cls))
    return np.nanmean(np.where(union > 0, inter / np.maximum(union, 1), np.nan))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size)
    targets = [rng.integers(0, args.classes, shape, dtype=np.uint8) for _ in range(args.maps)]
    preds = [np.where(rng.random(shape) < 0.6, (t * 5) % args.k, rng.integers(0, args.k, shape)).astype(np.int32)
             for t in targets]
    t0 = time.perf_counter()
    ours = evaluate(preds, targets, n_concepts=args.k, n_classes=args.classes)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = reference(preds, targets, args.k, args.classes)
    ref_s = time.perf_counter() - t0
    assert abs(ours.miou - ref) < 1e-12, (ours.miou, ref)
    print(f"{args.maps} maps of {args.size}x{args.size}, k={args.k}, {args.classes} classes: fseg_jax.evaluate "
          f"{ours_s:.2f} s, numpy/scipy loop {ref_s:.2f} s, ratio {ours_s / ref_s:.3f} (mIoU {ours.miou:.4f} both)")


if __name__ == "__main__":
    main()
