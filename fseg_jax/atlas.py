"""What each concept looks like: the image patches where its weight is highest, as one picture per bank.

:func:`concept_atlas` streams images through a segmentation :class:`~fseg_jax.segmentation.Pipeline`,
keeps for every concept the ``n`` tokens of largest weight seen so far (with a ``patch`` x ``patch`` pixel crop
around each) and counts how often each concept wins a token, so memory depends on k, n and the patch size,
not on the number of images. :func:`save_atlas` writes the grid (one row per concept: its colour and index,
then its patches, strongest first) as PNG and the numbers behind it as JSON beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fseg_jax._files import atomic_paths
from fseg_jax.concepts.names import ConceptClasses
from fseg_jax.io.images import as_rgb, to_uint8
from fseg_jax.options import SLIDE_DEFAULTS, check_positive
from fseg_jax.visualize import palette


@dataclasses.dataclass(frozen=True)
class ConceptAtlas:
    """The strongest patches of every concept and the statistics of the images they were drawn from.

    Attributes:
        patches: (k, n, patch, patch, 3) uint8 crops centred on the tokens, strongest first (white where a
            concept has fewer than n tokens with positive weight).
        weights: (k, n) float32 weight of each patch's token (-inf where there is none).
        sources: (k, n, 3) int64 (input index, token row, token column) of each patch (-1 where none); a
            slide's tokens are on its token grid at the working resolution.
        share: (k,) share of all tokens on which the concept has the largest weight.
        mean_weight: (k,) mean weight of the concept over all tokens.
        tokens: number of tokens seen (for slides, tissue tokens only).
        patch_size: the model's patch (token) size in pixels.
        inputs: per input, what it was: {"kind": "image" | "slide", "source", "width", "height"} and for
            slides the working and level-0 microns per pixel ("mpp", "slide_mpp").
        classes: the bank's classes for k when it names its concepts (rows then show each concept's class
            name in its class colour), else None.
    """

    patches: np.ndarray
    weights: np.ndarray
    sources: np.ndarray
    share: np.ndarray
    mean_weight: np.ndarray
    tokens: int
    patch_size: int
    inputs: tuple[dict[str, Any], ...] = ()
    classes: ConceptClasses | None = None

    def picture(self, *, gap: int = 2) -> np.ndarray:
        """The atlas as one (H, W, 3) uint8 image: a row per concept, its colour, index and class name first."""
        from PIL import Image, ImageDraw

        k, n, size = self.patches.shape[:3]
        colours, texts = self._legend()
        label_width = max(40, 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t)) for t in texts))
        height = k * (size + gap) + gap
        width = label_width + n * (size + gap) + gap
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c in range(k):
            top = gap + c * (size + gap)
            draw.rectangle([gap, top, label_width - gap, top + size - 1], fill=tuple(int(v) for v in colours[c]))
            draw.text((gap + 3, top + 3), texts[c], fill=(0, 0, 0))
            for j in range(n):
                left = label_width + gap + j * (size + gap)
                canvas.paste(Image.fromarray(self.patches[c, j]), (left, top))
        return np.asarray(canvas)

    def _legend(self) -> tuple[np.ndarray, list[str]]:
        """(k, 3) uint8 colour and the text of each concept's row: its index, and its class name if named."""
        k = self.patches.shape[0]
        if self.classes is None:
            return palette(k), [str(c) for c in range(k)]
        lut = self.classes.lut
        named = [self.classes.is_named(int(j)) for j in lut]
        texts = [f"{c} {self.classes.names[j]}" if named[c] else str(c) for c, j in enumerate(lut)]
        return self.classes.rgb(palette(k))[lut], texts

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: per concept its share of tokens, mean weight and its patches' sources (for a
        slide also the token centre in level-0 pixels, ready to find in a slide viewer)."""
        return {
            "tokens": self.tokens,
            "patch_size": self.patch_size,
            "inputs": list(self.inputs),
            "concepts": [
                {
                    "index": c,
                    **({"class": self.classes.names[self.classes.lut[c]]} if self.classes is not None else {}),
                    "share": float(self.share[c]),
                    "mean_weight": float(self.mean_weight[c]),
                    "patches": [self._patch_entry(int(i), int(y), int(x), float(w))
                                for (i, y, x), w in zip(self.sources[c], self.weights[c]) if i >= 0],
                }
                for c in range(self.weights.shape[0])
            ],
        }

    def _patch_entry(self, i: int, y: int, x: int, weight: float) -> dict[str, Any]:
        entry: dict[str, Any] = {"image": i, "token": [y, x], "weight": weight}
        source = self.inputs[i] if i < len(self.inputs) else {}
        if source.get("kind") == "slide":
            level0 = (self.patch_size * source["mpp"] / source["slide_mpp"])
            entry["level0_xy"] = [round((x + 0.5) * level0, 1), round((y + 0.5) * level0, 1)]
        return entry


def concept_atlas(
    images: Any,
    concepts=None,
    *,
    model=None,
    k: int | None = None,
    n: int = 8,
    patch: int = 64,
    mpp: float = SLIDE_DEFAULTS["mpp"],
    slide_mpp: float | None = SLIDE_DEFAULTS["slide_mpp"],
    tile: int | None = SLIDE_DEFAULTS["tile"],
    pipeline=None,
    **pipeline_options,
) -> ConceptAtlas:
    """The ``n`` strongest ``patch`` x ``patch`` pixel patches of every concept over ``images``.

    Args:
        images: what :func:`fseg_jax.build_concepts` takes (a folder, one path, one ``(H, W, 3)`` array, a
            ``(B, H, W, 3)`` batch, or a list or other iterable of these), read one at a time; folders and lists
            may hold whole slides too. Images: arrays, PIL images or image paths (as :func:`fseg_jax.segment`
            takes one). Slides: :class:`fseg_jax.wsi.Slide` objects or paths of whole-slide files (.svs, .ndpi,
            .mrxs, ..., and TIFFs that open as tiled slides); a slide
            is read at ``mpp`` microns per pixel in tissue tiles of ``tile`` pixels with the context margins of
            :func:`fseg_jax.segment_slide`, and only its tissue tokens count.
        concepts, model, k: as for :func:`fseg_jax.segment` (the model defaults to the one the bank records).
        n: patches kept per concept.
        patch: side of each crop in pixels, centred on the token (white beyond the image or slide).
        mpp, slide_mpp, tile: for slides: the working microns per pixel, the level-0 microns per pixel of slide
            files that do not record it (a ``Slide`` object carries its own), and the tile side (a multiple of
            the model's patch size; default 512 px rounded down to whole patches).
        pipeline: a ``fseg_jax.Pipeline`` made before, in place of ``concepts``, ``model``, ``k`` and the options.
        **pipeline_options: the other run options of ``Pipeline.create`` (``layer``, ``solver``, ``dtype``,
            ``batch``, ``random_init``, ...), passed untouched. The method must be ``"project"`` (the default):
            the weights are the NNLS weights F-Seg labels with.

    Returns:
        A :class:`ConceptAtlas`.
    """
    from fseg_jax.segmentation import Pipeline

    if n < 1 or patch < 1:
        raise ValueError(f"n and patch must be positive, got n={n}, patch={patch}")
    mpp = check_positive("mpp", mpp)
    if pipeline is None:
        pipeline = Pipeline.create(concepts, model=model, k=k, **pipeline_options)
    elif concepts is not None or model is not None or k is not None or pipeline_options:
        raise ValueError("pass either pipeline= or the concepts, model and options to make one, not both")
    if pipeline.method != "project":
        raise ValueError(f"the atlas ranks tokens by their NNLS weights: method must be 'project', got "
                         f"{pipeline.method!r}")
    p = pipeline.model.config.patch_size
    tile = 512 // p * p if tile is None else tile
    top = _TopPatches(pipeline.program_concepts.shape[0], n, patch)
    inputs: list[dict[str, Any]] = []
    from fseg_jax.io import IMAGE_SUFFIXES, iter_images
    from fseg_jax.wsi.reader import SLIDE_SUFFIXES

    for index, (name, item) in enumerate(iter_images(images, sorted(SLIDE_SUFFIXES.union(IMAGE_SUFFIXES)))):
        slide, owned = _as_slide(item, slide_mpp)
        if slide is None:
            image = as_rgb(item, name=name)  # 16-bit and float images are segmented as they are
            w_hwk = np.asarray(pipeline.weights(image))
            rgb = to_uint8(image)
            h, w, kk = w_hwk.shape
            coords = np.stack(np.divmod(np.arange(h * w), w), axis=1)
            top.add(w_hwk.reshape(h * w, kk), coords, index, _image_crop(rgb, p, patch))
            inputs.append({"kind": "image", "source": _source_name(item), "height": rgb.shape[0], "width": rgb.shape[1]})
            continue
        try:
            plan = slide.plan(mpp)
            for rgb, (rows, cols), margin, tissue in _tissue_tiles(slide, plan, tile, p):
                w_hwk = np.asarray(pipeline.weights(rgb))
                core = w_hwk[margin : margin + rows.stop - rows.start, margin : margin + cols.stop - cols.start]
                ys, xs = np.nonzero(tissue)
                coords = np.stack([ys + rows.start, xs + cols.start], axis=1)
                top.add(core[ys, xs], coords, index, _slide_crop(slide, plan, p, patch))
        finally:
            if owned:  # a Slide the caller passed stays open for the caller
                slide.close()
        inputs.append({"kind": "slide", "source": str(slide.path), "mpp": plan.mpp, "slide_mpp": slide.mpp,
                           "width": plan.size[0], "height": plan.size[1]})
    if top.tokens == 0:
        raise ValueError("no images, or no tissue in the slides, to build the atlas from")
    return top.result(p, inputs, pipeline.classes)


class _TopPatches:
    """The streaming state of an atlas: per concept the n strongest tokens so far, win counts, weight sums."""

    def __init__(self, k: int, n: int, patch: int):
        self.n = n
        self.weights = np.full((k, n), -np.inf, np.float32)
        self.sources = np.full((k, n, 3), -1, np.int64)
        self.patches = np.full((k, n, patch, patch, 3), 255, np.uint8)
        self.wins = np.zeros(k, np.int64)
        self.weight_sum = np.zeros(k, np.float64)
        self.tokens = 0

    def add(self, w_mk: np.ndarray, coords_m2: np.ndarray, source: int, crop: Callable[[int, int], np.ndarray]):
        """Fold in m tokens' weights, their (row, col) on the source's token grid and a crop maker."""
        m, k = w_mk.shape
        if m == 0:
            return
        self.tokens += m
        self.wins += np.bincount(w_mk.argmax(axis=1), minlength=k)
        self.weight_sum += w_mk.sum(axis=0)
        n = self.n
        strongest = np.argsort(-w_mk, axis=0, kind="stable")[:n]  # (<=n, k) token indices, strongest first
        for c in range(k):
            candidates = [t for t in strongest[:, c] if w_mk[t, c] > 0]
            if not candidates:
                continue
            merged_w = np.concatenate([self.weights[c], w_mk[candidates, c]])
            order = np.argsort(-merged_w, kind="stable")[:n]
            new_patch = np.empty_like(self.patches[c])
            new_src = np.empty_like(self.sources[c])
            for slot, i in enumerate(order):
                if i < n:
                    new_patch[slot], new_src[slot] = self.patches[c, i], self.sources[c, i]
                else:
                    y, x = (int(v) for v in coords_m2[candidates[i - n]])
                    new_patch[slot], new_src[slot] = crop(y, x), (source, y, x)
            self.weights[c], self.patches[c], self.sources[c] = merged_w[order], new_patch, new_src

    def result(self, patch_size: int, inputs: list[dict[str, Any]], classes) -> ConceptAtlas:
        return ConceptAtlas(
            self.patches, self.weights, self.sources, self.wins / self.tokens, self.weight_sum / self.tokens,
            self.tokens, patch_size, tuple(inputs), classes,
        )


def _as_slide(item: Any, slide_mpp: float | None):
    """(`item` as an open whole slide, whether it was opened here), or (None, False) for an image (array, PIL
    image or image file)."""
    if isinstance(item, (str, os.PathLike)):
        from fseg_jax.io import IMAGE_SUFFIXES
        from fseg_jax.wsi.reader import SLIDE_SUFFIXES, ImageSlide, open_slide

        path = Path(item)
        suffix = path.suffix.lower()
        whole_slide = suffix in SLIDE_SUFFIXES.difference(IMAGE_SUFFIXES)  # .svs, .ndpi, ...
        if not whole_slide and suffix not in (".tif", ".tiff"):
            return None, False

        slide = open_slide(path, slide_mpp=slide_mpp)
        if isinstance(slide, ImageSlide):  # a plain (untiled) TIFF is an image
            slide.close()
            return None, False
        return slide, True
    from fseg_jax.wsi.reader import Slide

    return (item, False) if isinstance(item, Slide) else (None, False)


def _tissue_tiles(slide, plan, tile: int, p: int):
    """Each tissue tile of `slide` at `plan`: (RGB, token-grid (rows, cols) of its core, margin in tokens,
    tissue mask of the core's tokens), the tiling and tissue rule of the slide pipeline."""
    from fseg_jax.wsi.tiling import TileGrid
    from fseg_jax.wsi.tissue import detect_tissue

    grid = TileGrid.for_slide(plan.size, patch=p, tile=tile)
    _, tissue = detect_tissue(slide, size=plan.size, patch=p)
    for t in grid.tiles_with(tissue):
        rows, cols = grid.core_slices(int(t))
        yield slide.read(plan, *grid.read_box(int(t))), (rows, cols), grid.margin_tokens, tissue[rows, cols]


def _image_crop(rgb: np.ndarray, p: int, size: int) -> Callable[[int, int], np.ndarray]:
    return lambda y, x: _crop(rgb, (y + 0.5) * p, (x + 0.5) * p, size)


def _slide_crop(slide, plan, p: int, size: int) -> Callable[[int, int], np.ndarray]:
    """Crops read from the slide itself, so a patch at a tile's edge shows its real surroundings."""

    def crop(y: int, x: int) -> np.ndarray:
        top, left = int(round((y + 0.5) * p - size / 2)), int(round((x + 0.5) * p - size / 2))
        return slide.read(plan, left, top, size, size)

    return crop


def _source_name(item: Any) -> str:
    return str(item) if isinstance(item, (str, os.PathLike)) else type(item).__name__


def save_atlas(path: str | Path, atlas: ConceptAtlas) -> tuple[Path, Path]:
    """Write the atlas picture to ``path`` (PNG) and its numbers to the same name with ``.json``: both, or
    (on any error) neither. The folder is made when missing."""
    from PIL import Image

    path = Path(path)
    numbers = path.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(path, numbers) as (picture, summary):
        Image.fromarray(atlas.picture()).save(picture, format="PNG")
        summary.write_text(json.dumps(atlas.summary(), indent=1))
    return path, numbers


def _crop(rgb: np.ndarray, cy: float, cx: float, size: int) -> np.ndarray:
    """A size x size crop of ``rgb`` centred at (cy, cx) pixels, white beyond the image."""
    out = np.full((size, size, 3), 255, np.uint8)
    top, left = int(round(cy - size / 2)), int(round(cx - size / 2))
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + size, rgb.shape[0]), min(left + size, rgb.shape[1])
    if y1 > y0 and x1 > x0:
        out[y0 - top : y1 - top, x0 - left : x1 - left] = rgb[y0:y1, x0:x1]
    return out
