"""Which files of a folder are images, and the image files a list of files and folders names."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def files_in_folder(folder: str | os.PathLike, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of `folder` whose extension (any case) is one of `suffixes`, sorted; hidden files skipped."""
    wanted = {s.lower() for s in suffixes}
    return sorted(
        p for p in Path(folder).iterdir() if p.suffix.lower() in wanted and p.is_file() and not p.name.startswith(".")
    )


def expand_image_paths(paths: Iterable[str | os.PathLike], suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Files as they are and folders as their image files (`files_in_folder`), in the order given.

    Raises FileNotFoundError for a path that is neither a file nor a folder and ValueError for a folder
    without images.
    """
    suffixes = tuple(suffixes)
    files: list[Path] = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = files_in_folder(path, suffixes)
            if not found:
                raise ValueError(f"{path}: folder holds no images ({', '.join(suffixes)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files
