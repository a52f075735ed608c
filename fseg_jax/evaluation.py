"""Score unsupervised label maps against annotations, as the unsupervised segmentation literature does.

Concepts carry no class names, so each concept is first matched to a class on the confusion matrix
accumulated over the whole evaluation set (not averaged per image):

- ``"hungarian"``: one-to-one, maximising the pixels matched (``scipy.optimize.linear_sum_assignment``, as
  STEGO's ``UnsupervisedMetrics``); concepts left without a class (k > classes) count as wrong everywhere.
- ``"many_to_one"``: each concept to its majority class, for banks with more concepts than classes.

Then the (class x class) confusion of the mapped labels gives the per-class IoU, their mean over the classes
present in the target or the mapped prediction, and the pixel accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Iterable

import numpy as np

MATCHINGS = ("hungarian", "many_to_one")


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate` returns.

    Attributes:
        miou: mean IoU over the classes that occur in the target or in the mapped prediction.
        pixel_accuracy: share of the scored pixels whose mapped label is the target's.
        iou: (classes,) float64 IoU per class; NaN for a class absent from both.
        mapping: (concepts,) int64, the class each concept is mapped to; -1 for a concept left unmatched.
        confusion: (concepts, classes) int64 pixel counts, concept in the prediction by class in the target.
        matching: ``"hungarian"`` or ``"many_to_one"``.
        pixels: number of pixels scored (ignored ones left out).
    """

    miou: float
    pixel_accuracy: float
    iou: np.ndarray
    mapping: np.ndarray
    confusion: np.ndarray
    matching: str
    pixels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: numbers and lists (NaN IoUs as None)."""
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "iou": [None if np.isnan(v) else float(v) for v in self.iou],
            "mapping": self.mapping.tolist(),
            "confusion": self.confusion.tolist(),
            "matching": self.matching,
            "pixels": self.pixels,
        }


def confusion_matrix(
    pred,
    target,
    *,
    n_concepts: int | None = None,
    n_classes: int | None = None,
    ignore_index: int | None = None,
) -> np.ndarray:
    """(concepts, classes) int64 pixel counts over one label map or many (summed over all of them).

    ``pred`` and ``target``: one (H, W) integer map each, a (B, H, W) array each, or two equally long
    sequences of maps; each pair must have the same shape. ``n_concepts`` / ``n_classes`` default to the
    largest label seen plus one; labels must be non-negative and below them. Target pixels equal to
    ``ignore_index`` are left out.
    """
    pairs = _pairs(pred, target)
    checked = []
    for i, (p, t) in enumerate(pairs):
        keep = np.ones(t.shape, bool) if ignore_index is None else t != ignore_index
        p, t = p[keep], t[keep]
        for name, labels in (("prediction", p), ("target", t)):
            if labels.size and labels.min() < 0:
                raise ValueError(f"{name} {i} has negative labels ({labels.min()}); labels are 0, 1, 2, ...")
        checked.append((p, t))
    seen_p = max((int(p.max()) + 1 for p, _ in checked if p.size), default=0)
    seen_t = max((int(t.max()) + 1 for _, t in checked if t.size), default=0)
    k = seen_p if n_concepts is None else int(n_concepts)
    c = seen_t if n_classes is None else int(n_classes)
    if seen_p > k:
        raise ValueError(f"prediction labels reach {seen_p - 1}, out of range for n_concepts={k}")
    if seen_t > c:
        raise ValueError(f"target labels reach {seen_t - 1}, out of range for n_classes={c}")
    counts = np.zeros(k * c, np.int64)
    for p, t in checked:
        counts += np.bincount(p.astype(np.int64) * c + t, minlength=k * c)
    return counts.reshape(k, c)


def evaluate(
    pred,
    target,
    *,
    matching: str = "hungarian",
    ignore_index: int | None = None,
    n_concepts: int | None = None,
    n_classes: int | None = None,
) -> EvaluationResult:
    """Match concepts to classes on the whole set's confusion matrix and score the mapped labels.

    Args:
        pred: predicted concept labels: one (H, W) integer map, a (B, H, W) array or a sequence of maps.
        target: class labels, paired with ``pred`` map by map (same shapes).
        matching: ``"hungarian"`` (one-to-one) or ``"many_to_one"`` (each concept to its majority class).
        ignore_index: target value of pixels left out (e.g. 255 for unannotated). Without it, a target value
            that looks like such a mark (see :func:`ignore_label_hint`) is scored as a class, with a UserWarning.
        n_concepts, n_classes: the label ranges (default: the largest label seen plus one), so that concepts
            or classes absent from this set still get a row, column and IoU entry.

    Returns:
        An :class:`EvaluationResult` (mIoU, pixel accuracy, IoU per class, mapping, confusion matrix).
        ValueError when no pixel is left to score.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; choose one of {', '.join(MATCHINGS)}")
    confusion = confusion_matrix(pred, target, n_concepts=n_concepts, n_classes=n_classes,
                                 ignore_index=ignore_index)
    if not confusion.any():
        raise ValueError(
            f"no pixel to score: every target pixel equals ignore_index={ignore_index}"
            if ignore_index is not None else "no pixel to score: the label maps are empty"
        )
    hint = ignore_label_hint(confusion) if ignore_index is None else None
    if hint is not None:
        warnings.warn(hint, UserWarning, stacklevel=2)
    return score_confusion(confusion, matching=matching)


def ignore_label_hint(confusion) -> str | None:
    """A sentence when the target of a (concepts, classes) confusion matrix scored without an ignore index
    looks like it marks unlabelled pixels with one large value (255, say): that value on at least 1% of the
    pixels and more than twice the next largest class present; else None."""
    counts = np.asarray(confusion).sum(axis=0)
    present = np.flatnonzero(counts)
    if len(present) < 2 or present[-1] < 255:
        return None
    value, below = int(present[-1]), int(present[-2])
    share = counts[value] / counts.sum()
    if share < 0.01 or value <= 2 * below:
        return None
    return (
        f"target value {value} covers {share:.0%} of the pixels, far above the other classes (0..{below}), and "
        f"is scored as a class of its own; if it marks unlabelled pixels, leave it out with ignore_index={value} "
        f"(--ignore-index {value})"
    )


def score_confusion(confusion, *, matching: str = "hungarian") -> EvaluationResult:
    """:func:`evaluate` from an accumulated (concepts, classes) confusion matrix."""
    from scipy.optimize import linear_sum_assignment

    confusion = np.asarray(confusion, np.int64)
    if confusion.ndim != 2:
        raise ValueError(f"confusion must be a (concepts, classes) matrix, got shape {confusion.shape}")
    k, c = confusion.shape
    mapping = np.full(k, -1, np.int64)
    if matching == "hungarian":
        rows, cols = linear_sum_assignment(confusion, maximize=True)
        mapping[rows] = cols
    elif matching == "many_to_one":
        present = confusion.sum(axis=1) > 0
        mapping[present] = np.argmax(confusion[present], axis=1)
    else:
        raise ValueError(f"unknown matching {matching!r}; choose one of {', '.join(MATCHINGS)}")
    mapped = np.zeros((c, c), np.int64)  # mapped class by target class; unmatched concepts count nowhere
    for concept in np.flatnonzero(mapping >= 0):
        mapped[mapping[concept]] += confusion[concept]
    total = int(confusion.sum())
    hits = np.diag(mapped)
    union = confusion.sum(axis=0) + mapped.sum(axis=1) - hits  # target pixels + predicted pixels - both
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / np.maximum(union, 1), np.nan)
    scored = ~np.isnan(iou)
    return EvaluationResult(
        miou=float(iou[scored].mean()) if scored.any() else float("nan"),
        pixel_accuracy=float(hits.sum() / total) if total else float("nan"),
        iou=iou,
        mapping=mapping,
        confusion=confusion,
        matching=matching,
        pixels=total,
    )


def _pairs(pred, target) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, target) integer maps, one pair per image, shapes checked."""
    for name, one, other in (("target", target, pred), ("prediction", pred, target)):
        shape, other_shape = tuple(getattr(one, "shape", ())), tuple(getattr(other, "shape", ()))
        if len(shape) == 3 and shape[-1] in (3, 4) and shape[:2] == other_shape:
            raise ValueError(
                f"the {name} is an (H, W, {shape[-1]}) colour image; evaluate takes (H, W) integer label maps "
                "(turn each colour into its class index first)"
            )
    preds, targets = _maps(pred, "prediction"), _maps(target, "target")
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predicted label maps but {len(targets)} targets; pass them in pairs")
    if not preds:
        raise ValueError("no label maps to evaluate")
    for i, (p, t) in enumerate(zip(preds, targets)):
        if p.shape != t.shape:
            raise ValueError(f"label map {i}: prediction is {p.shape[0]}x{p.shape[1]} but target is "
                             f"{t.shape[0]}x{t.shape[1]}; evaluate maps of the same size")
    return list(zip(preds, targets))


def _maps(labels, name: str) -> list[np.ndarray]:
    if isinstance(labels, np.ndarray) or hasattr(labels, "__array__") and not isinstance(labels, (list, tuple)):
        array = np.asarray(labels)
        items: Iterable = [array] if array.ndim == 2 else list(array) if array.ndim == 3 else [array]
    else:
        items = labels
    if isinstance(labels, (str, bytes, os.PathLike)):
        items = [labels]
    out = []
    for i, m in enumerate(items):
        if isinstance(m, (str, bytes, os.PathLike)):
            raise TypeError(
                f"{name} {i}: evaluate takes label maps as arrays, got the path {m!r}; read the file first "
                "(np.load, PIL.Image.open), or score files with fseg-jax evaluate"
            )
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"{name} {i}: expected an (H, W) label map, got shape {m.shape}")
        if not np.issubdtype(m.dtype, np.integer):
            raise TypeError(f"{name} {i}: labels must be integers, got {m.dtype}")
        out.append(m)
    return out
