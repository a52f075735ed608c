"""Tissue detection on a low-resolution thumbnail: Otsu's threshold on saturation, then cleanup.

Stained tissue is coloured, glass is grey or white: saturation separates them better than brightness
(which pen marks, folds and dust also change). Specks smaller than `min_area_um2` are dropped and holes
smaller than it are filled, so fat and lumina inside tissue stay tissue.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Saturation below this is never tissue, whatever Otsu says (a blank slide has only noise to split).
MIN_SATURATION = 0.05
# Longer side of the thumbnail on which tissue is found, in pixels.
THUMBNAIL_SIDE = 2048


def saturation(rgb_hw3: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a (h, w, 3) uint8 image, as float32."""
    rgb = rgb_hw3.astype(np.float32)
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0).astype(np.float32)


def tissue_mask(thumb_hw3: np.ndarray, *, mpp: float, min_area_um2: float = 10_000.0) -> np.ndarray:
    """(h, w) bool tissue mask of a thumbnail whose pixels are `mpp` microns wide.

    Components and holes smaller than `min_area_um2` (or 1/200 of the image, if less) are removed / filled.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    sat = saturation(thumb_hw3)
    threshold = MIN_SATURATION
    if sat.max() > sat.min():
        threshold = max(threshold, float(threshold_otsu(sat)))
    mask = sat > threshold
    # on a small image (a crop, a biopsy fragment) a speck is relative: at most 1/200 of the image
    min_px = max(1, int(round(min(min_area_um2 / (mpp * mpp), mask.size / 200))))
    # 4-connected components (connectivity=1) of fewer than min_px pixels go, as do holes of fewer
    mask = remove_small_objects(mask, connectivity=1, max_size=min_px - 1)
    return remove_small_holes(mask, connectivity=1, max_size=min_px - 1)


def resize_mask(mask_hw: np.ndarray, shape_hw: tuple[int, int], *, min_fraction: float = 0.5) -> np.ndarray:
    """A bool mask resampled to `shape_hw` (area average, then cells at least `min_fraction` covered)."""
    img = Image.fromarray(mask_hw.astype(np.uint8) * 255)
    frac = np.asarray(img.resize((shape_hw[1], shape_hw[0]), resample=Image.Resampling.BOX), np.float32) / 255.0
    return frac >= min_fraction


def detect_tissue(slide, *, size: tuple[int, int], patch: int, thumbnail_side: int = THUMBNAIL_SIDE):
    """(thumbnail (h, w, 3) uint8, token tissue mask (h_tok, w_tok) bool) of a slide.

    size: (width, height) of the slide at the working resolution; token (r, c) covers working pixels
    [r*patch, (r+1)*patch) x [c*patch, (c+1)*patch), so the token grid overhangs the slide by under one
    token on the bottom and right. A token is tissue when at least half of its part inside the slide is:
    the overhang, which does not exist, counts for nothing, so tissue that runs to the slide's edge keeps
    its last partial row and column of tokens.
    """
    thumb = slide.thumbnail(thumbnail_side)
    th, tw = thumb.shape[:2]
    width, height = size
    mask = tissue_mask(thumb, mpp=slide.mpp * slide.dimensions[0] / tw)
    h_tok, w_tok = -(-height // patch), -(-width // patch)
    # the token grid's extent in thumbnail pixels (at least the thumbnail, as the grid covers the slide)
    extent_hw = (max(th, round(h_tok * patch * th / height)), max(tw, round(w_tok * patch * tw / width)))
    tissue = np.zeros(extent_hw, np.float32)
    tissue[:th, :tw] = mask
    inside = np.zeros(extent_hw, np.float32)
    inside[:th, :tw] = 1.0
    tissue_share, inside_share = (_box_mean(a, (h_tok, w_tok)) for a in (tissue, inside))
    return thumb, tissue_share >= 0.5 * np.maximum(inside_share, 1e-6)


def _box_mean(a_hw: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """A float (h, w) array area-averaged onto `shape_hw` cells."""
    img = Image.fromarray(a_hw.astype(np.float32), mode="F")
    return np.asarray(img.resize((shape_hw[1], shape_hw[0]), resample=Image.Resampling.BOX), np.float32)
