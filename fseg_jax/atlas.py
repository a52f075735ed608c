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
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fseg_jax._files import atomic_path
from fseg_jax.io.images import as_rgb, to_uint8
from fseg_jax.visualize import palette


@dataclasses.dataclass(frozen=True)
class ConceptAtlas:
    """The strongest patches of every concept and the statistics of the images they were drawn from.

    Attributes:
        patches: (k, n, patch, patch, 3) uint8 crops centred on the tokens, strongest first (white where a
            concept has fewer than n tokens with positive weight).
        weights: (k, n) float32 weight of each patch's token (-inf where there is none).
        sources: (k, n, 3) int64 (image index, token row, token column) of each patch (-1 where none).
        share: (k,) share of all tokens on which the concept has the largest weight.
        mean_weight: (k,) mean weight of the concept over all tokens.
        tokens: number of tokens seen.
    """

    patches: np.ndarray
    weights: np.ndarray
    sources: np.ndarray
    share: np.ndarray
    mean_weight: np.ndarray
    tokens: int

    def picture(self, *, gap: int = 2, label_width: int = 40) -> np.ndarray:
        """The atlas as one (H, W, 3) uint8 image: a row per concept, its colour and index first."""
        from PIL import Image, ImageDraw

        k, n, size = self.patches.shape[:3]
        colours = palette(k)
        height = k * (size + gap) + gap
        width = label_width + n * (size + gap) + gap
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for c in range(k):
            top = gap + c * (size + gap)
            draw.rectangle([gap, top, label_width - gap, top + size - 1], fill=tuple(int(v) for v in colours[c]))
            draw.text((gap + 3, top + 3), str(c), fill=(0, 0, 0))
            for j in range(n):
                left = label_width + gap + j * (size + gap)
                canvas.paste(Image.fromarray(self.patches[c, j]), (left, top))
        return np.asarray(canvas)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: per concept its share of tokens, mean weight and its patches' sources."""
        return {
            "tokens": self.tokens,
            "concepts": [
                {
                    "index": c,
                    "share": float(self.share[c]),
                    "mean_weight": float(self.mean_weight[c]),
                    "patches": [
                        {"image": int(i), "token": [int(y), int(x)], "weight": float(w)}
                        for (i, y, x), w in zip(self.sources[c], self.weights[c])
                        if i >= 0
                    ],
                }
                for c in range(self.weights.shape[0])
            ],
        }


def concept_atlas(
    images: Iterable[Any],
    concepts=None,
    *,
    model=None,
    k: int | None = None,
    n: int = 8,
    patch: int = 64,
    **pipeline_options,
) -> ConceptAtlas:
    """The ``n`` strongest ``patch`` x ``patch`` pixel patches of every concept over ``images``.

    Args:
        images: an iterable of images (arrays, PIL images or paths, as :func:`fseg_jax.segment` takes one),
            read one at a time.
        concepts, model, k: as for :func:`fseg_jax.segment` (the model defaults to the one the bank records).
        n: patches kept per concept.
        patch: side of each crop in pixels, centred on the token (white beyond the image).
        **pipeline_options: other options of ``Pipeline.create`` (``layer``, ``solver``, ``dtype``, ...).
            The method is ``"project"``: the weights are the NNLS weights F-Seg labels with.

    Returns:
        A :class:`ConceptAtlas`.
    """
    from fseg_jax.segmentation import Pipeline

    if n < 1 or patch < 1:
        raise ValueError(f"n and patch must be positive, got n={n}, patch={patch}")
    pipeline = Pipeline.create(concepts, model=model, k=k, method="project", **pipeline_options)
    p = pipeline.model.config.patch_size
    kk = pipeline.program_concepts.shape[0]
    best_w = np.full((kk, n), -np.inf, np.float32)
    best_src = np.full((kk, n, 3), -1, np.int64)
    best_patch = np.full((kk, n, patch, patch, 3), 255, np.uint8)
    wins = np.zeros(kk, np.int64)
    weight_sum = np.zeros(kk, np.float64)
    tokens = 0
    for index, image in enumerate(images):
        rgb = to_uint8(as_rgb(image, name=f"image {index}"))
        w_hwk = np.asarray(pipeline.segment(rgb, return_weights=True).weights)
        h, w, _ = w_hwk.shape
        flat = w_hwk.reshape(h * w, kk)
        tokens += h * w
        wins += np.bincount(flat.argmax(axis=1), minlength=kk)
        weight_sum += flat.sum(axis=0)
        top = np.argsort(-flat, axis=0, kind="stable")[:n]  # (<=n, k) token indices, strongest first
        for c in range(kk):
            candidates = [t for t in top[:, c] if flat[t, c] > 0]
            if not candidates:
                continue
            merged_w = np.concatenate([best_w[c], flat[candidates, c]])
            order = np.argsort(-merged_w, kind="stable")[:n]
            new_patch = np.empty_like(best_patch[c])
            new_src = np.empty_like(best_src[c])
            for slot, source in enumerate(order):
                if source < n:
                    new_patch[slot], new_src[slot] = best_patch[c, source], best_src[c, source]
                else:
                    y, x = divmod(int(candidates[source - n]), w)
                    new_patch[slot] = _crop(rgb, (y + 0.5) * p, (x + 0.5) * p, patch)
                    new_src[slot] = (index, y, x)
            best_w[c], best_patch[c], best_src[c] = merged_w[order], new_patch, new_src
    if tokens == 0:
        raise ValueError("no images to build the atlas from")
    return ConceptAtlas(best_patch, best_w, best_src, wins / tokens, weight_sum / tokens, tokens)


def save_atlas(path: str | Path, atlas: ConceptAtlas) -> tuple[Path, Path]:
    """Write the atlas picture to ``path`` (PNG) and its numbers to the same name with ``.json``."""
    from PIL import Image

    path = Path(path)
    numbers = path.with_suffix(".json")
    with atomic_path(path) as tmp:
        Image.fromarray(atlas.picture()).save(tmp, format="PNG")
    with atomic_path(numbers) as tmp:
        tmp.write_text(json.dumps(atlas.summary(), indent=1))
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
