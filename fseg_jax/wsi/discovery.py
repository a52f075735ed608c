"""Which slides a path names, and the output folder each slide's files go to."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from fseg_jax.io import files_in_folder
from fseg_jax.wsi.reader import SLIDE_SUFFIXES


def find_slides(slides: str | Path | Iterable[str | Path]) -> list[Path]:
    """A slide path as a list, the slides and images of a folder (sorted), or a list of paths.

    Raises ValueError for a folder that holds no slide: a run over it would produce nothing.
    """
    if isinstance(slides, (str, Path)):
        p = Path(slides)
        if not p.is_dir():
            return [p]
        found = files_in_folder(p, SLIDE_SUFFIXES)
        if not found:
            raise ValueError(f"{p}: the folder holds no slide or image ({', '.join(sorted(SLIDE_SUFFIXES))})")
        return found
    return [Path(s) for s in slides]


def slide_folder_name(path: Path) -> str:
    """The output sub-folder of a slide: its file name without the extension (.ome.tif counted whole)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def slide_out_dirs(paths: Sequence[Path], out_root: str | Path) -> list[Path]:
    """The output folder of each slide, `out_root/<slide_folder_name>`; ValueError naming both files when two
    slides would share one (``cmu.svs`` and ``cmu.tif``; names that differ only in case count as one, as on
    case-insensitive file systems): one would overwrite the other's outputs. A slide listed twice is refused alike."""
    out_root = Path(out_root)
    seen: dict[str, Path] = {}
    dirs = []
    for path in paths:
        name = slide_folder_name(path)
        other = seen.setdefault(name.casefold(), path)
        if other is not path and other == path:
            raise ValueError(f"{path} is listed twice: list each slide once")
        if other is not path:
            raise ValueError(
                f"{other} and {path} would both write {out_root / name}: rename one, or segment them into "
                "separate output folders"
            )
        dirs.append(out_root / name)
    return dirs
