"""Whole-slide images: reading by microns per pixel, tissue detection, tiled segmentation and its outputs.

`segment_slide` (also `fseg_jax.segment_slide`) segments one slide; `SlideSegmenter` compiles once and runs
on many (`segment_slides` for a folder, over several processes with `fseg_jax.wsi.cohort.JaxProcesses`);
`merge_slide` writes the outputs of a slide split by hand (`SlideSegmenter.run(part=)`); `open_slide` reads
any supported slide or image. A run holds each slide's output folder: another run there is `FolderBusy`.
"""

from fseg_jax.wsi.pipeline import (
    DeviceMemoryError,
    FolderBusy,
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
    "FolderBusy",
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
