"""Whole-slide images: reading by microns per pixel, tissue detection, tiled segmentation and its outputs.

`segment_slide` (also `fseg_jax.segment_slide`) segments one slide; `SlideSegmenter` compiles once and runs
on many (`segment_slides` for a folder); `merge_slide` writes the outputs of a multi-process run;
`open_slide` reads any supported slide or image.
"""

from fseg_jax.wsi.pipeline import (
    DeviceMemoryError,
    SlideFailure,
    SlideResult,
    SlideRunMismatch,
    SlideSegmenter,
    merge_slide,
    segment_slide,
    segment_slides,
)
from fseg_jax.wsi.reader import Slide, SlideError, open_slide

__all__ = [
    "DeviceMemoryError",
    "Slide",
    "SlideError",
    "SlideFailure",
    "SlideResult",
    "SlideRunMismatch",
    "SlideSegmenter",
    "merge_slide",
    "open_slide",
    "segment_slide",
    "segment_slides",
]
