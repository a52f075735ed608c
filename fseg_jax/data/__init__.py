"""A small real H&E image that ships with the package, for trying fseg_jax on a bare machine.

``he_sample.jpg`` is a 640 x 512 crop of OpenSlide's CMU-1-Small-Region test slide (CC0 1.0); source,
crop box and license are in ``README.md`` beside it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

SAMPLE_FILE = "he_sample.jpg"


def sample_image_path() -> Path:
    """The path of the sample JPEG inside the installed package."""
    return Path(str(resources.files(__name__) / SAMPLE_FILE))


def sample_image() -> np.ndarray:
    """The sample H&E image as a new (512, 640, 3) uint8 RGB array."""
    from PIL import Image

    with Image.open(sample_image_path()) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
