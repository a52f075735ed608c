"""Which files of a folder are images, the image files a list of files and folders names, and the images
the ``images`` argument of the streaming functions (banks, atlas) names."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


def iter_images(images: Any, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> Iterator[tuple[str, Any]]:
    """``(name, image)`` for each image that `images` names, in order, without reading any: a folder (its files
    with `suffixes`, sorted, not recursive; ValueError when it holds none), one path, one ``(H, W, C)`` array
    or PIL image, a ``(B, H, W, C)`` batch, or a list, tuple or other iterable of these (folders in it
    expanded; an empty list is a ValueError). Paths are yielded as given, named by their path; other items
    by their place (``images[3]``), for the reader's error messages."""
    suffixes = tuple(suffixes)
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if path.is_dir():
            files = files_in_folder(path, suffixes)
            if not files:
                raise ValueError(f"no image files ({', '.join(suffixes)}) in folder {path}")
            for p in files:
                yield str(p), p
            return
        yield str(path), images
        return
    if hasattr(images, "shape"):
        if len(images.shape) == 4:
            for i in range(images.shape[0]):
                yield f"images[{i}]", images[i]
            return
        yield "image", images
        return
    if isinstance(images, (list, tuple)) and not images:
        raise ValueError("images: empty list")
    if not isinstance(images, Iterable) or isinstance(images, bytes):
        yield "image", images  # a PIL image, or something the reader refuses by name
        return
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            if Path(item).is_dir():
                yield from iter_images(item, suffixes)
            else:
                yield str(item), item
        else:
            yield f"images[{i}]", item
