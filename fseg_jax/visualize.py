"""Pictures of a segmentation: a fixed palette per concept index and the label map blended over the image.

One colour per concept everywhere: concept i is ``palette(k)[i]`` in image overlays, the atlas, the slide overlay,
GeoJSON, the viewer and summary.json (or its class's colour when a bank names it), and a slide's background is
:data:`BACKGROUND`, outside the concepts' palette.

Only numpy and Pillow (a core dependency); no plotting library.
"""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from fseg_jax.io import as_rgb, to_uint8
from fseg_jax.options import check_alpha

if TYPE_CHECKING:
    from fseg_jax.concepts.names import ConceptClasses

BACKGROUND = (160, 160, 160)
"""The colour of background (a slide's label 0, the glass): a neutral grey no concept takes."""

# The first 19 concepts: Sasha Trubetskoy's "20 simple, distinct colours" without white, black and grey.
_BASE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
)
_GOLDEN = 0.6180339887498949


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 RGB colours for concept indices 0..n-1, the same for every n (``palette(m)`` is a prefix
    of ``palette(n)`` for m <= n); none is :data:`BACKGROUND`. The first 19 are a hand-chosen qualitative table;
    later ones step the hue by the golden ratio, cycling through three saturation/brightness levels."""
    n = int(n)
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    colours = list(_BASE[:n])
    for i in range(len(_BASE), n):
        j = i - len(_BASE)
        hue = (0.11 + j * _GOLDEN) % 1.0
        sat, val = ((0.85, 0.95), (0.55, 0.85), (0.95, 0.6))[(j // 7) % 3]
        colours.append(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)))
    return np.asarray(colours, dtype=np.uint8).reshape(n, 3)


def overlay(
    image: Any,
    labels: Any,
    *,
    alpha: float = 0.5,
    legend: bool = False,
    palette: Any = None,
    names: Sequence[str] | None = None,
    classes: ConceptClasses | None = None,
) -> np.ndarray:
    """Blend a label map over an image; with ``classes``, the concepts of one class as one region.

    Args:
        image: (H, W, 3) uint8 RGB array or a PIL image (converted by :func:`fseg_jax.io.as_rgb`: alpha
            composited over white, 16-bit scaled to uint8).
        labels: (H, W) integer label map; values index the palette (0 <= label < len(palette)).
        alpha: opacity of the colours, 0 (image only) to 1 (colours only).
        legend: append a white strip under the picture with one entry per label present: its colour, its
            index (and name) and its share of the pixels; with `classes`, one entry per class present: its
            colour, name (and concepts) and the summed share of its concepts.
        palette: (n, 3) uint8 colours, default :func:`palette` sized to the labels and `names` (label i in concept
            i's colour, as every output draws it). With `classes`,
            the colours of the concepts, which a class without a colour of its own takes from its first concept.
        names: optional display names per label index (legend only).
        classes: the bank's classes (``ConceptBank.classes(k)``) when `labels` are concept indices 0..k-1:
            each concept is drawn in its class's colour, and the legend names the classes (not with `names`).

    Returns:
        A new (H, W, 3) uint8 array, or (H + strip, W, 3) with `legend`. The inputs are never modified.
    """
    rgb = to_uint8(as_rgb(image if isinstance(image, Image.Image) else _rgb_uint8_array(image)))
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) label map, got shape {lab.shape}")
    if lab.shape != rgb.shape[:2]:
        raise ValueError(f"labels shape {lab.shape} does not match the image's {rgb.shape[:2]} (H, W)")
    if lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    alpha = check_alpha(alpha)
    if lab.size and int(lab.min()) < 0:
        raise ValueError(f"labels must be >= 0, got a minimum of {int(lab.min())}")
    n_labels = int(lab.max()) + 1 if lab.size else 0
    if classes is not None:
        if names is not None:
            raise ValueError("give names or classes, not both: the classes name the labels")
        colours = classes.rgb(_label_colours(palette, classes.k, classes.k))
        lab = classes.map(lab)
        n_labels = len(classes)
        texts = [
            f"{name} ({', '.join(map(str, members))})" if classes.is_named(j) else name
            for j, (name, members) in enumerate(zip(classes.names, classes.concepts))
        ]
    else:
        if names is not None:
            names = [str(s) for s in names]
            if len(names) < n_labels:
                raise ValueError(f"names has {len(names)} entries but labels go up to {n_labels - 1}")
        colours = _label_colours(palette, max(n_labels, len(names or ())), n_labels)
        texts = [f"{i} {names[i]}" if names is not None else f"{i}" for i in range(n_labels)]

    # integer blend: (image * (256 - a) + colour * a + 128) >> 8, a = round(256 * alpha); fits uint16
    a = int(round(float(alpha) * 256))
    out = ((rgb.astype(np.uint16) * (256 - a) + colours[lab].astype(np.uint16) * a + 128) >> 8).astype(np.uint8)
    if not legend:
        return out
    counts = np.bincount(lab.ravel(), minlength=n_labels)
    return np.concatenate([out, _legend_strip(out.shape[1], counts, colours, texts)], axis=0)


def _rgb_uint8_array(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {arr.dtype}")
    return arr


def _label_colours(given: Any, n: int, n_labels: int) -> np.ndarray:
    """`given` (an (m, 3) palette with a colour for each of `n_labels` labels) as uint8, or `palette(n)`."""
    if given is None:
        return palette(n)
    colours = np.asarray(given)
    if colours.ndim != 2 or colours.shape[1] != 3:
        raise ValueError(f"palette must be an (n, 3) array of RGB colours, got shape {colours.shape}")
    if colours.dtype.kind not in "iu" or (colours.size and (colours.min() < 0 or colours.max() > 255)):
        raise ValueError("palette colours must be integers in 0..255")
    if len(colours) < n_labels:
        raise ValueError(f"palette has {len(colours)} colours but labels go up to {n_labels - 1}")
    return colours.astype(np.uint8)


def _legend_strip(width: int, counts: np.ndarray, colours: np.ndarray, texts: list[str]) -> np.ndarray:
    """A white (h, width, 3) strip: one swatch + "text: share%" per present label, wrapped into rows."""
    from PIL import ImageDraw, ImageFont

    size = int(np.clip(width // 60, 10, 28))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow built without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    total = max(int(counts.sum()), 1)
    entries = []
    for idx in np.flatnonzero(counts):
        share = 100.0 * counts[idx] / total
        share_text = f"{share:.1f}%" if share >= 0.05 else "<0.1%"
        entries.append((int(idx), f"{texts[idx]}: {share_text}"))

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(probe.textbbox((0, 0), "0:%Ag", font=font)[3], size) + 4
    swatch, pad = line_h - 4, max(size // 2, 4)
    positions, x, y = [], pad, pad
    for idx, text in entries:
        w = swatch + 4 + int(probe.textlength(text, font=font)) + 2 * pad
        if x > pad and x + w > width:
            x, y = pad, y + line_h
        positions.append((x, y, idx, text))
        x += w
    height = y + line_h + pad if entries else 2 * pad
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for x, y, idx, text in positions:
        draw.rectangle([x, y + 2, x + swatch, y + 2 + swatch], fill=tuple(int(c) for c in colours[idx]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 4, y), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip)
