"""Deep Zoom pyramids: their geometry, and writing one a level at a time, each level atomically.

A Deep Zoom image of (width, height) pixels has levels 0 .. ceil(log2(max(width, height))); level L is the
image halved (max level - L) times, rounding up, and is cut into tiles of `tile_size` pixels, each extended
by `overlap` pixels on the sides that have a neighbour. Tile (col, row) of level L is the file
``<name>_files/<L>/<col>_<row>.<format>``; ``<name>.dzi`` describes the whole. This is the layout of
openslide's DeepZoomGenerator and of OpenSeadragon's DziTileSource.

`write_pyramid` writes each level into a temporary folder and renames it into place once complete, so a
level folder exists only when it is whole; it skips the levels already there and writes the .dzi last.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from fseg_jax._files import atomic_path

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"

# (col, row) of a tile within its level
TileAddress = tuple[int, int]


@dataclass(frozen=True)
class DeepZoomGeometry:
    """Levels, level sizes and tile boxes of a Deep Zoom image of `size` = (width, height) pixels."""

    size: tuple[int, int]
    tile_size: int = 254
    overlap: int = 1

    def __post_init__(self):
        if self.tile_size < 1 or self.overlap < 0:
            raise ValueError(f"tile_size must be >= 1 and overlap >= 0, got {self.tile_size} and {self.overlap}")
        if min(self.size) < 1:
            raise ValueError(f"an image of {self.size[0]} x {self.size[1]} pixels has no Deep Zoom pyramid")

    @property
    def level_count(self) -> int:
        return math.ceil(math.log2(max(self.size))) + 1

    @property
    def max_level(self) -> int:
        return self.level_count - 1

    def downsample(self, level: int) -> int:
        """Full-size pixels per pixel of `level` along each axis."""
        return 2 ** (self.max_level - level)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, 0 (one pixel) first."""
        out = []
        for level in range(self.level_count):
            d = self.downsample(level)
            out.append((-(-self.size[0] // d), -(-self.size[1] // d)))
        return tuple(out)

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles of each level."""
        t = self.tile_size
        return tuple((-(-w // t), -(-h // t)) for w, h in self.level_dimensions)

    def tile_box(self, level: int, address: TileAddress) -> tuple[int, int, int, int]:
        """(x, y, width, height) in `level` pixels of tile `address` = (col, row), overlap included."""
        col, row = address
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise ValueError(f"level {level} has {cols} x {rows} tiles, no tile {address}")
        lw, lh = self.level_dimensions[level]
        t, o = self.tile_size, self.overlap
        x0 = col * t - (o if col > 0 else 0)
        y0 = row * t - (o if row > 0 else 0)
        x1 = min((col + 1) * t + o, lw)
        y1 = min((row + 1) * t + o, lh)
        return x0, y0, x1 - x0, y1 - y0

    def tile_dimensions(self, level: int, address: TileAddress) -> tuple[int, int]:
        return self.tile_box(level, address)[2:]

    def dzi(self, fmt: str) -> str:
        """The .dzi descriptor."""
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="{DZI_NAMESPACE}" Format="{fmt}" Overlap="{self.overlap}" TileSize="{self.tile_size}">'
            f'<Size Width="{self.size[0]}" Height="{self.size[1]}"/></Image>\n'
        )


# a level's tiles, in any order: (col, row, image)
LevelTiles = Callable[[int], Iterator[tuple[int, int, Image.Image]]]


def write_pyramid(
    folder: Path, name: str, geometry: DeepZoomGeometry, level_tiles: LevelTiles, *, fmt: str, save_options: dict
) -> list[int]:
    """Write the Deep Zoom image `name` (``name.dzi`` and ``name_files/``) into `folder`; return the levels written.

    level_tiles(level) yields every tile of a level as (col, row, PIL image of `geometry.tile_dimensions`).
    Levels are written from the largest down, each into a temporary folder renamed into place when done;
    levels already in place are kept as they are, temporaries a killed run left are removed, and the .dzi
    is written last (temporary file, then rename).
    """
    files = folder / f"{name}_files"
    files.mkdir(parents=True, exist_ok=True)
    remove_stale_levels(files)
    written = []
    for level in reversed(range(geometry.level_count)):
        final = files / str(level)
        if final.is_dir():
            continue
        tmp = files / f".{level}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        written_tiles = set()
        cols, rows = geometry.level_tiles[level]
        for col, row, image in level_tiles(level):
            if image.size != geometry.tile_dimensions(level, (col, row)):
                raise ValueError(
                    f"tile {col}_{row} of level {level} is {image.size[0]} x {image.size[1]}, "
                    f"expected {geometry.tile_dimensions(level, (col, row))}"
                )
            tile = f"{col}_{row}.{fmt}"
            try:
                image.save(tmp / tile, **save_options)
            except OSError as err:  # named as the tile it would have become, not by the temporary level folder
                raise OSError(err.errno, err.strerror or str(err), str(final / tile)) from err
            written_tiles.add((col, row))
        if len(written_tiles) != cols * rows:
            raise ValueError(f"level {level}: {len(written_tiles)} tiles written, {cols * rows} expected")
        os.replace(tmp, final)
        written.append(level)
    _fsync_dir(files)
    write_if_changed(folder / f"{name}.dzi", geometry.dzi(fmt))
    return written


def remove_stale_levels(files: Path) -> None:
    """Remove the temporary level folders a killed run left in a pyramid's ``_files`` folder."""
    for tmp in files.glob(".*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def write_if_changed(path: Path, text: str | bytes) -> bool:
    """Write `text` to `path` atomically unless the file already holds exactly that; True when written."""
    data = text.encode() if isinstance(text, str) else text
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
