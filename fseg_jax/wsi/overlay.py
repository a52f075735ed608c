"""overlay.png of a slide run: the tissue thumbnail with the labels blended in and a legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fseg_jax._files import atomic_path
from fseg_jax.wsi.sampling import LabelSampler, cell_centres


def write_overlay(
    path: Path, thumb: np.ndarray, sample: LabelSampler, *, size: tuple[int, int], names, colors
) -> None:
    """The thumbnail with the labels blended in (background left as it is) and a legend of the labels present.

    The thumbnail spans the slide's `size` = (width, height) working pixels; each thumbnail pixel shows the
    label at the working pixel under its centre, from `sample(ys, xs)`.
    """
    from PIL import Image

    from fseg_jax.visualize import overlay

    th, tw = thumb.shape[:2]
    width, height = size
    labels_thumb = sample(cell_centres(th, height), cell_centres(tw, width))
    image = overlay(thumb, labels_thumb, legend=True, palette=colors, names=names)
    background = labels_thumb == 0
    image[:th][background] = thumb[background]
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
