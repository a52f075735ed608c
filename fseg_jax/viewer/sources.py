"""Where the viewer's tiles come from: the slide at a run's working resolution, and the run's label map.

`SlideTiles` cuts the slide into Deep Zoom tiles at the working resolution: through openslide's
DeepZoomGenerator when openslide reads the slide and one of its Deep Zoom levels is exactly the working size,
else through `fseg_jax.wsi.reader` (any slide or image it reads), one tile read at a time either way; a
read that fails raises the reader's SlideError, whatever the library underneath raised.
`LabelTiles` cuts labels.ome.tif into tiles of label values, one band of tile rows at a time, from the
TIFF level whose halvings match the Deep Zoom level (each pixel the label at the top-left of its block).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from fseg_jax.viewer.deepzoom import DeepZoomGeometry
from fseg_jax.wsi.reader import ReadPlan, Slide, SlideError, open_slide


class SlideTiles:
    """The tiles of `geometry` (whose size is the run's working size) cut from the slide at `path`.

    target_mpp and slide_mpp: as the run's summary.json records them; the slide must plan to the working
    size `geometry.size` at `target_mpp`, or it is not the slide the run segmented (SlideError). Tiles that
    cannot be read raise SlideError too.
    """

    def __init__(self, path: str | Path, geometry: DeepZoomGeometry, *, target_mpp: float, slide_mpp: float):
        self.geometry = geometry
        # the resolution the run used, accepted then (forced, perhaps, against the file's): not judged again
        self._reader: Slide = open_slide(path, slide_mpp=slide_mpp, force_slide_mpp=True)
        self._openslide = None
        self._deepzoom = None
        try:
            self._plan = self._reader.plan(target_mpp)
            if tuple(self._plan.size) != tuple(geometry.size):
                w, h = self._plan.size
                raise SlideError(
                    f"{self._reader.path}: at {target_mpp} um/px this slide is {w} x {h} pixels, the segmented one "
                    f"{geometry.size[0]} x {geometry.size[1]}: it is not the slide the run segmented"
                )
            if self._reader.backend == "openslide":
                try:
                    self._deepzoom = self._openslide_deepzoom()
                except Exception as err:  # noqa: BLE001 - openslide.OpenSlideError and the like
                    raise SlideError(f"{self._reader.path}: openslide cannot tile this slide ({err})") from err
        except Exception:
            self.close()
            raise

    @property
    def source(self) -> str:
        """How tiles are cut: "openslide-deepzoom" or "reader:<backend>"."""
        return "openslide-deepzoom" if self._deepzoom is not None else f"reader:{self._reader.backend}"

    def _openslide_deepzoom(self):
        """(DeepZoomGenerator, its level index of our level 0), or None when none of its levels is the working size."""
        import openslide
        from openslide.deepzoom import DeepZoomGenerator

        g = self.geometry
        self._openslide = openslide.OpenSlide(str(self._reader.path))
        dz = DeepZoomGenerator(self._openslide, tile_size=g.tile_size, overlap=g.overlap, limit_bounds=False)
        dims = [tuple(d) for d in dz.level_dimensions]
        if tuple(g.size) not in dims:
            self._openslide.close()
            self._openslide = None
            return None
        return dz, dims.index(tuple(g.size)) - g.max_level

    def level_tiles(self, level: int) -> Iterator[tuple[int, int, Image.Image]]:
        """Every tile of `level`; a read the slide's library fails raises SlideError, naming the slide and tile."""
        cols, rows = self.geometry.level_tiles[level]
        if self._deepzoom is not None:
            dz, offset = self._deepzoom

            def read(address: tuple[int, int]) -> Image.Image:
                return self._deepzoom_tile(dz, level + offset, address)
        else:
            plan = self._level_plan(level)

            def read(address: tuple[int, int]) -> Image.Image:
                return Image.fromarray(self._reader.read(plan, *self.geometry.tile_box(level, address)))

        for row in range(rows):
            for col in range(cols):
                try:
                    tile = read((col, row))
                except Exception as err:  # noqa: BLE001 - openslide, tiffslide and their codecs raise many types
                    raise SlideError(
                        f"{self._reader.path}: reading tile {col}_{row} of Deep Zoom level {level} failed "
                        f"({type(err).__name__}: {err})"
                    ) from err
                yield col, row, tile

    def _deepzoom_tile(self, dz, dz_level: int, address: tuple[int, int]) -> Image.Image:
        """DeepZoomGenerator.get_tile, resized to the tile's exact dimensions (get_tile keeps the read
        region's aspect ratio, which can make a tile a pixel narrower than get_tile_dimensions says)."""
        import openslide

        location, slide_level, size = dz.get_tile_coordinates(dz_level, address)
        region = self._openslide.read_region(location, slide_level, size)
        background = "#" + self._openslide.properties.get(openslide.PROPERTY_NAME_BACKGROUND_COLOR, "ffffff")
        tile = Image.new("RGB", region.size, background)
        tile.paste(region, mask=region)
        expected = dz.get_tile_dimensions(dz_level, address)
        if tile.size != expected:
            tile = tile.resize(expected, Image.Resampling.LANCZOS)
        return tile

    def _level_plan(self, level: int) -> ReadPlan:
        """How the reader reads Deep Zoom `level`: the finest slide level at or above its detail, resampled."""
        d = self.geometry.downsample(level)
        downsamples = self._reader.level_downsamples
        factor = self._plan.scale * downsamples[self._plan.level] * d  # level-0 pixels per pixel of `level`
        finer = [i for i, ds in enumerate(downsamples) if ds <= factor * (1 + 1e-9)]
        slide_level = max(finer, key=lambda i: downsamples[i]) if finer else 0
        scale = factor / downsamples[slide_level]
        if math.isclose(scale, 1.0, rel_tol=1e-9):
            scale = 1.0
        return ReadPlan(
            level=slide_level, scale=scale, mpp=self._plan.mpp * d, size=self.geometry.level_dimensions[level]
        )

    def close(self) -> None:
        self._deepzoom = None
        if self._openslide is not None:
            self._openslide.close()
            self._openslide = None
        self._reader.close()

    def __enter__(self) -> SlideTiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LabelTiles:
    """The tiles of `geometry` cut from a label map written by `fseg_jax.wsi.outputs.write_label_tiff`.

    Tiles are PIL images whose pixel values are the labels: greyscale ("L") for uint8 maps; for uint16 maps,
    RGB with the low byte in red and the high byte in green (`encoding` says which).
    """

    def __init__(self, path: str | Path, geometry: DeepZoomGeometry):
        import tifffile
        import zarr

        self.geometry = geometry
        self._tif = tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            width, height = geometry.size
            if tuple(series.levels[0].shape) != (height, width):
                shape = series.levels[0].shape
                raise ValueError(
                    f"{path}: the label map is {shape[-1]} x {shape[0]} pixels, the run's working size "
                    f"{width} x {height}"
                )
            self.dtype = np.dtype(series.dtype)
            self._levels = [zarr.open(series.aszarr(level=j), mode="r") for j in range(len(series.levels))]
        except Exception:
            self._tif.close()
            raise

    @property
    def encoding(self) -> str:
        return "gray" if self.dtype == np.uint8 else "rg"

    def level_tiles(self, level: int) -> Iterator[tuple[int, int, Image.Image]]:
        g = self.geometry
        d = g.downsample(level)
        j = min(int(math.log2(d)), len(self._levels) - 1)  # TIFF level j holds every 2**j-th pixel
        stride = d // 2**j
        source = self._levels[j]
        lw, _ = g.level_dimensions[level]
        cols, rows = g.level_tiles[level]
        for row in range(rows):
            _, y0, _, h = g.tile_box(level, (0, row))
            band = np.asarray(source[y0 * stride : (y0 + h - 1) * stride + 1, : (lw - 1) * stride + 1])
            band = band[::stride, ::stride]
            for col in range(cols):
                x0, _, w, _ = g.tile_box(level, (col, row))
                yield col, row, self._image(band[:, x0 : x0 + w])

    def _image(self, labels_hw: np.ndarray) -> Image.Image:
        if self.encoding == "gray":
            return Image.fromarray(np.ascontiguousarray(labels_hw, np.uint8))
        rgb = np.zeros((*labels_hw.shape, 3), np.uint8)
        rgb[..., 0] = labels_hw & 0xFF
        rgb[..., 1] = labels_hw >> 8
        return Image.fromarray(rgb)

    def close(self) -> None:
        self._tif.close()

    def __enter__(self) -> LabelTiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
