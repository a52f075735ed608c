"""Overlays: the palette, the blend, the legend strip, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fseg_jax.visualize import overlay, palette


def test_palette_is_fixed_distinct_and_prefix_stable():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(palette(20), p[:20])
    np.testing.assert_array_equal(palette(7), p[:7])
    assert tuple(p[0]) == (160, 160, 160)  # neutral: slides give it to background
    assert len({tuple(c) for c in p[:256]}) == 256
    # the hand-chosen part is well separated
    first = p[:20].astype(float)
    dist = np.sqrt(((first[:, None] - first[None]) ** 2).sum(-1)) + np.eye(20) * 1e9
    assert dist.min() > 40
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        palette(-1)


def _scene(h=40, w=60, k=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, k, (h, w)).astype(np.int32)


def test_blend_endpoints_and_midpoint():
    image, labels = _scene()
    np.testing.assert_array_equal(overlay(image, labels, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, labels, alpha=1.0), palette(5)[labels])
    half = overlay(image, labels, alpha=0.5).astype(int)
    expected = (image.astype(int) + palette(5)[labels].astype(int)) / 2
    assert np.abs(half - expected).max() <= 1


def test_inputs_untouched_and_other_input_kinds():
    from PIL import Image

    image, labels = _scene()
    im0, lab0 = image.copy(), labels.copy()
    out = overlay(image, labels.astype(np.uint16), legend=True, names=[f"c{i}" for i in range(5)])
    np.testing.assert_array_equal(image, im0)
    np.testing.assert_array_equal(labels, lab0)
    assert out.dtype == np.uint8 and out.shape[1:] == (60, 3) and out.shape[0] > 40
    np.testing.assert_array_equal(overlay(Image.fromarray(image), labels), overlay(image, labels))
    custom = np.array([[0, 0, 0], [255, 255, 255], [1, 2, 3], [4, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(overlay(image, labels, alpha=1.0, palette=custom), custom[labels])


def test_legend_lists_present_labels_with_their_colours():
    image = np.full((100, 400, 3), 255, np.uint8)
    labels = np.zeros((100, 400), np.int32)
    labels[:, 100:] = 3
    labels[:, 390:] = 30  # a label beyond the hand-chosen table
    out = overlay(image, labels, alpha=1.0, legend=True)
    strip = out[100:].reshape(-1, 3)
    colours = {tuple(c) for c in strip}
    for idx in (0, 3, 30):
        assert tuple(palette(31)[idx]) in colours
    for idx in (1, 2, 4):  # absent labels get no entry
        assert tuple(palette(31)[idx]) not in colours
    assert (0, 0, 0) in colours  # text


@pytest.mark.parametrize(
    "image, labels, kwargs, message",
    [
        (np.zeros((4, 5, 3), np.uint8), np.zeros((5, 4), int), {}, r"labels shape \(5, 4\) does not match"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5, 1), int), {}, "2-D"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5)), {}, "integers"),
        (np.zeros((4, 5, 3), np.uint8), -np.ones((4, 5), int), {}, ">= 0"),
        (np.zeros((4, 5), np.uint8), np.zeros((4, 5), int), {}, r"\(H, W, 3\)"),
        (np.zeros((4, 5, 3), np.float32), np.zeros((4, 5), int), {}, "uint8"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 3), {"palette": np.zeros((3, 3), np.uint8)}, "3 colours"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), int), {"palette": np.zeros((3, 4), np.uint8)}, r"\(n, 3\)"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), int), {"alpha": 1.5}, "alpha"),
        (np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 2), {"names": ["a"]}, "names has 1"),
    ],
)
def test_bad_inputs(image, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        overlay(image, labels, **kwargs)


def test_classes_colour_concepts_by_class_and_merge_their_legend_entries():
    from fseg_jax.concepts import ConceptClasses

    classes = ConceptClasses.from_names(6, {1: "tumour", 2: "stroma", 4: "stroma"}, {2: "#0000ff"})
    image = np.full((100, 600, 3), 255, np.uint8)
    labels = np.zeros((100, 600), np.int32)
    labels[:, 100:200] = 1
    labels[:, 200:300] = 2
    labels[:, 300:400] = 4
    labels[:, 400:] = 5
    before = labels.copy()
    out = overlay(image, labels, alpha=1.0, legend=True, classes=classes)
    np.testing.assert_array_equal(labels, before)
    expected = classes.rgb(palette(6))[classes.map(labels)]
    np.testing.assert_array_equal(out[:100], expected)
    assert tuple(out[50, 250]) == tuple(out[50, 350]) == (0, 0, 255)  # concepts 2 and 4: one class, one colour
    assert tuple(out[50, 150]) == tuple(palette(6)[1])  # tumour keeps its concept's palette colour
    # the legend is the one an overlay of the class labels with the class names draws
    texts = ["concept 0", "tumour (1)", "stroma (2, 4)", "concept 3", "concept 5"]
    from fseg_jax.visualize import _legend_strip

    counts = np.bincount(classes.map(labels).ravel(), minlength=len(classes))
    assert counts.tolist() == [10000, 10000, 20000, 0, 20000]  # stroma: the area of both concepts
    np.testing.assert_array_equal(out[100:], _legend_strip(600, counts, classes.rgb(palette(6)), texts))
    strip = {tuple(c) for c in out[100:].reshape(-1, 3)}
    assert (0, 0, 255) in strip and tuple(palette(6)[4]) not in strip and tuple(palette(6)[3]) not in strip
    # a custom palette colours the concepts; classes without a colour take their first concept's
    custom = np.arange(18, dtype=np.uint8).reshape(6, 3)
    drawn = overlay(image, labels, alpha=1.0, palette=custom, classes=classes)
    np.testing.assert_array_equal(drawn[50, 450], custom[5])


def test_classes_refuse_labels_out_of_range_and_names():
    from fseg_jax.concepts import ConceptClasses

    classes = ConceptClasses.from_names(3, {0: "a"})
    with pytest.raises(ValueError, match=r"label 3 is out of range for the 3 concepts"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.full((2, 2), 3), classes=classes)
    with pytest.raises(ValueError, match="names or classes, not both"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), int), classes=classes, names=["a", "b", "c"])
