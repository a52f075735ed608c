"""fseg_jax.evaluate against a direct per-pixel reference (scipy's assignment, boolean masks), and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy.optimize import linear_sum_assignment

import fseg_jax
from fseg_jax.cli import main


def reference(preds, targets, matching, ignore_index=None, n_concepts=None, n_classes=None):
    """The metrics computed the slow, obvious way: pixel by pixel, class by class."""
    p = np.concatenate([np.ravel(a) for a in preds]).astype(np.int64)
    t = np.concatenate([np.ravel(a) for a in targets]).astype(np.int64)
    if ignore_index is not None:
        p, t = p[t != ignore_index], t[t != ignore_index]
    k = n_concepts or int(p.max()) + 1
    c = n_classes or int(t.max()) + 1
    confusion = np.zeros((k, c), np.int64)
    np.add.at(confusion, (p, t), 1)
    mapping = np.full(k, -1)
    if matching == "hungarian":
        rows, cols = linear_sum_assignment(-confusion)
        mapping[rows] = cols
    else:
        for concept in range(k):
            if confusion[concept].sum():
                mapping[concept] = int(np.argmax(confusion[concept]))
    mapped = mapping[p]
    ious = []
    for cls in range(c):
        union = np.sum((mapped == cls) | (t == cls))
        ious.append(np.sum((mapped == cls) & (t == cls)) / union if union else np.nan)
    ious = np.array(ious)
    return confusion, mapping, ious, np.nanmean(ious), np.mean(mapped == t)


def check(preds, targets, matching, **kwargs):
    ours = fseg_jax.evaluate(preds, targets, matching=matching, **kwargs)
    confusion, mapping, ious, miou, acc = reference(preds, targets, matching, **kwargs)
    np.testing.assert_array_equal(ours.confusion, confusion)
    np.testing.assert_array_equal(ours.mapping, mapping)
    np.testing.assert_allclose(ours.iou, ious, rtol=1e-12, equal_nan=True)
    assert ours.miou == pytest.approx(miou, rel=1e-12) and ours.pixel_accuracy == pytest.approx(acc, rel=1e-12)
    return ours


@pytest.mark.parametrize("matching", ["hungarian", "many_to_one"])
@pytest.mark.parametrize("k, c", [(4, 4), (7, 3), (2, 5)])
def test_random_sets_match_the_reference(matching, k, c):
    rng = np.random.default_rng(k * 10 + c)
    targets = [rng.integers(0, c, size) for size in [(17, 23), (5, 40), (31, 9)]]
    # predictions correlated with the targets, through a random concept per class plus noise
    preds = [np.where(rng.random(t.shape) < 0.7, (t * 3 + 1) % k, rng.integers(0, k, t.shape)) for t in targets]
    check(preds, targets, matching)
    check(preds, targets, matching, ignore_index=0)


def test_hand_made_case():
    pred = np.array([[0, 0, 1, 1],
                     [0, 2, 2, 1]])
    target = np.array([[1, 1, 0, 0],
                       [1, 1, 0, 9]])  # 9: unannotated
    result = check([pred], [target], "hungarian", ignore_index=9)
    # concept 0 -> class 1 (3 pixels), concept 1 -> class 0 (2 pixels), concept 2 matches nothing
    assert result.mapping.tolist() == [1, 0, -1]
    assert result.pixels == 7
    assert result.pixel_accuracy == pytest.approx(5 / 7)
    # class 0: 2 hits, 3 target pixels; class 1: 3 hits, 4 target pixels
    np.testing.assert_allclose(result.iou, [2 / 3, 3 / 4])


def test_absent_classes_and_concepts():
    target = np.array([[0, 0, 2, 2]])   # class 1 absent from the target
    pred = np.array([[3, 3, 0, 0]])     # concepts 1 and 2 absent from the prediction
    result = check([pred], [target], "hungarian", n_concepts=5, n_classes=4)
    assert result.confusion.shape == (5, 4)
    assert result.pixel_accuracy == 1.0
    assert np.isnan(result.iou[1]) and np.isnan(result.iou[3])  # in neither: left out of the mean
    assert result.miou == 1.0
    # many-to-one leaves the concepts that predict nothing unmapped
    many = check([pred], [target], "many_to_one", n_concepts=5, n_classes=4)
    assert many.mapping.tolist() == [2, -1, -1, 0, -1]


def test_confusion_is_accumulated_over_the_set_not_averaged():
    # image a alone would match concept 0 to class 0; over the set, class 1 dominates concept 0
    a_pred, a_target = np.zeros((1, 2), int), np.array([[0, 0]])
    b_pred, b_target = np.zeros((1, 6), int), np.ones((1, 6), int)
    result = check([a_pred, b_pred], [a_target, b_target], "hungarian")
    assert result.mapping.tolist() == [1]
    assert result.pixel_accuracy == pytest.approx(6 / 8)
    # a (B, H, W) array is a set of maps as well
    stacked = fseg_jax.evaluate(np.stack([b_pred, b_pred]), np.stack([b_target, b_target]))
    assert stacked.pixels == 12


@pytest.mark.parametrize(
    "pred, target, message",
    [
        (np.zeros((2, 3), int), np.zeros((3, 2), int), "prediction is 2x3 but target is 3x2"),
        (np.full((2, 2), -1), np.zeros((2, 2), int), "negative labels"),
        (np.zeros((2, 2)), np.zeros((2, 2), int), "must be integers"),
        ([], [], "no label maps"),
        ([np.zeros((2, 2), int)], [np.zeros((2, 2), int)] * 2, "1 predicted label maps but 2 targets"),
    ],
)
def test_bad_input_is_one_clear_error(pred, target, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fseg_jax.evaluate(pred, target)
    with pytest.raises(ValueError, match="out of range for n_classes=2"):
        fseg_jax.evaluate(np.zeros((2, 2), int), np.full((2, 2), 3), n_classes=2)
    with pytest.raises(ValueError, match="unknown matching"):
        fseg_jax.evaluate(np.zeros((2, 2), int), np.zeros((2, 2), int), matching="greedy")


def test_cli_pairs_folders_by_name_and_writes_json(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "pred").mkdir()
    (tmp_path / "masks").mkdir()
    preds, targets = [], []
    for name in ("a", "b"):
        target = rng.integers(0, 3, (12, 16)).astype(np.uint8)
        pred = ((target + 1) % 3).astype(np.int32)
        np.save(tmp_path / "pred" / f"{name}_labels.npy", pred)  # as fseg-jax segment names them
        Image.fromarray(pred.astype(np.uint8)).save(tmp_path / "pred" / f"{name}_labels.png")
        mask = Image.fromarray(target, mode="L").convert("P")  # a palette mask: read as its indices
        mask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        mask.save(tmp_path / "masks" / f"{name}.png")
        preds.append(pred)
        targets.append(target)
    report = tmp_path / "report.json"
    run = CliRunner().invoke(main, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "masks"), "-o", str(report)])
    assert run.exit_code == 0, run.output
    assert "mIoU 1.0000" in run.output
    data = json.loads(report.read_text())
    assert data["mapping"] == [2, 0, 1] and data["pixel_accuracy"] == 1.0 and len(data["pairs"]) == 2
    assert all(p.endswith(".npy") for p, _ in data["pairs"])

    (tmp_path / "masks" / "c.png").write_bytes((tmp_path / "masks" / "a.png").read_bytes())
    run = CliRunner().invoke(main, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "masks")])
    assert run.exit_code != 0 and "no prediction in" in run.output and "c" in run.output

    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "masks" / "c.png").unlink()
    run = CliRunner().invoke(main, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "masks")])
    assert run.exit_code != 0 and "a_labels.npy is 12x16 but" in run.output and "a.png is 5x5" in run.output
    empty = tmp_path / "empty"
    empty.mkdir()
    run = CliRunner().invoke(main, ["evaluate", str(empty), str(tmp_path / "masks")])
    assert run.exit_code == 1 and "no label maps in" in run.output
