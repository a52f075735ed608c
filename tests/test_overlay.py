"""Overlays: the palette, the blend, the legend strip, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from fseg_jax.visualize import BACKGROUND, overlay, palette


def test_palette_is_fixed_distinct_and_prefix_stable():
    p = palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    np.testing.assert_array_equal(palette(20), p[:20])
    np.testing.assert_array_equal(palette(7), p[:7])
    assert BACKGROUND == (160, 160, 160) and BACKGROUND not in {tuple(c) for c in p}  # background: no concept's
    assert len({tuple(c) for c in p[:256]}) == 256
    # the hand-chosen part is well separated, from each other and from background
    first = np.concatenate([p[:19], [BACKGROUND]]).astype(float)
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


STROMA = (214, 39, 40)  # "#d62728"


def _swatches(strip: np.ndarray, colour) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of each patch of at least 4 x 4 pixels in exactly `colour` (smaller ones are
    anti-aliased text)."""
    from scipy import ndimage

    found, _ = ndimage.label((strip == np.asarray(colour, np.uint8)).all(-1))
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in ndimage.find_objects(found)]
    return [b for b in boxes if b[2] - b[0] >= 4 and b[3] - b[1] >= 4]


def _ink(picture: np.ndarray) -> np.ndarray:
    """The part of a picture on white that is not white, cropped to its bounding box."""
    rows, cols = np.nonzero((picture != 255).any(-1))
    return picture[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def _written(text: str, ink: np.ndarray) -> bool:
    """Whether `ink` is `text` in black in Pillow's default font, at one of its sizes."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = [ImageFont.load_default()]
    try:
        fonts += [ImageFont.load_default(size=size) for size in range(8, 40)]
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the bitmap font only
        pass
    for font in fonts:
        canvas = Image.new("RGB", (40 * len(text) + 40, 80), (255, 255, 255))
        ImageDraw.Draw(canvas).text((20, 20), text, fill=(0, 0, 0), font=font)
        drawn = _ink(np.asarray(canvas))
        if drawn.shape == ink.shape and np.array_equal(drawn, ink):
            return True
    return False


def test_classes_colour_concepts_by_class_and_merge_their_legend_entries():
    from fseg_jax.concepts import ConceptClasses

    classes = ConceptClasses.from_names(6, {1: "tumour", 2: "stroma", 4: "stroma"}, {2: "#d62728"})
    # an image whose every value has the parity of the stroma colour's, so that the half blend is exact
    rng = np.random.default_rng(0)
    image = (rng.integers(0, 128, (100, 600, 3)) * 2 + np.array(STROMA) % 2).astype(np.uint8)
    labels = np.zeros((100, 600), np.int32)
    labels[:, 100:200] = 1
    labels[:, 200:300] = 2
    labels[:, 300:450] = 4
    labels[:, 450:] = 5
    before = labels.copy()
    out = overlay(image, labels, alpha=0.5, legend=True, classes=classes)
    np.testing.assert_array_equal(labels, before)
    # concepts 2 and 4, one class: the image half-blended with the class's colour
    stroma = (labels == 2) | (labels == 4)
    np.testing.assert_array_equal(out[:100][stroma], (image[stroma].astype(int) + STROMA) // 2)
    opaque = overlay(image, labels, alpha=1.0, classes=classes)
    assert tuple(opaque[50, 150]) == tuple(palette(6)[1])  # tumour keeps its concept's palette colour
    assert tuple(opaque[50, 250]) == tuple(opaque[50, 350]) == STROMA

    # the legend: one swatch per class present (concept 0, tumour, stroma, concept 5), none for concept 3
    # (absent) nor for concept 4 (drawn as stroma)
    strip = out[100:]
    present = {"concept 0": palette(6)[0], "tumour": palette(6)[1], "stroma": STROMA, "concept 5": palette(6)[5]}
    boxes = {name: _swatches(strip, colour) for name, colour in present.items()}
    assert all(len(found) == 1 for found in boxes.values()), boxes
    assert _swatches(strip, palette(6)[3]) == [] and _swatches(strip, palette(6)[4]) == []
    # beside the stroma swatch: its name, its concepts and the share of both concepts, 250 of 600 columns
    top, left, bottom, right = boxes["stroma"][0]
    after = [b[1] for found in boxes.values() for b in found if b[1] > right and b[0] < bottom and b[2] > top]
    text = strip[max(top - 4, 0) : bottom + 4, right + 2 : min(after, default=strip.shape[1]) - 2]
    assert _written("stroma (2, 4): 41.7%", _ink(text))
    assert not _written("stroma (2, 4): 16.7%", _ink(text))  # concept 2's share alone

    # a custom palette colours the concepts; classes without a colour take their first concept's
    custom = np.arange(18, dtype=np.uint8).reshape(6, 3)
    drawn = overlay(image, labels, alpha=1.0, palette=custom, classes=classes)
    np.testing.assert_array_equal(drawn[50, 500], custom[5])
    np.testing.assert_array_equal(drawn[50, 250], STROMA)


def test_classes_refuse_labels_out_of_range_and_names():
    from fseg_jax.concepts import ConceptClasses

    classes = ConceptClasses.from_names(3, {0: "a"})
    with pytest.raises(ValueError, match=r"label 3 is out of range for the 3 concepts"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.full((2, 2), 3), classes=classes)
    with pytest.raises(ValueError, match="names or classes, not both"):
        overlay(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), int), classes=classes, names=["a", "b", "c"])
