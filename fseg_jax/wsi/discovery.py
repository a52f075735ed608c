"""Which slides a path names, and the output folder each slide's files go to."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fseg_jax.io import files_in_folder
from fseg_jax.wsi.reader import SLIDE_SUFFIXES


def find_slides(slides: str | Path | Iterable[str | Path]) -> list[Path]:
    """A slide path as a list, the slides and images of a folder (sorted), or a list of paths."""
    if isinstance(slides, (str, Path)):
        p = Path(slides)
        return files_in_folder(p, SLIDE_SUFFIXES) if p.is_dir() else [p]
    return [Path(s) for s in slides]


def slide_folder_name(path: Path) -> str:
    """The output sub-folder of a slide: its file name without the extension (.ome.tif counted whole)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
