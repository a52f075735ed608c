"""One reading interface over whole-slide images and plain images, addressed in microns per pixel.

Backends, tried in this order:

- openslide (openslide-python with the openslide-bin wheel) for the vendor formats it recognises
  (Aperio SVS, Hamamatsu NDPI, MIRAX MRXS, Leica SCN, Ventana BIF, DICOM, Philips, ...);
- tiffslide for pyramidal TIFF and OME-TIFF: it sees the reduced levels that OME-TIFF keeps in SubIFDs,
  which openslide's generic-TIFF driver does not (openslide is still used for a generic tiled TIFF
  that tiffslide cannot open); it is also the fallback for the TIFF-based vendor formats (SVS, NDPI,
  SCN, BIF) when openslide is missing or fails on a file;
- Pillow (PNG, JPEG, flat TIFF, ...) for plain images, held in memory as one level.

`open_slide(path)` returns a `Slide`. Regions are read at a working resolution chosen by `Slide.plan(mpp)`:
the pyramid level closest to the target at or above it in detail, resized for the remainder, unless a
level is within `mpp_tolerance` of the target, in which case it is used as it is (no resampling) and the
working resolution is that level's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fseg_jax.io import as_rgb
from fseg_jax.options import check_positive, check_slide_mpp

SLIDE_SUFFIXES = frozenset(
    {
        ".svs", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".tif", ".tiff", ".svslide", ".dcm",
        ".png", ".jpg", ".jpeg",
    }
)


# TIFF containers that tiffslide may read when openslide does not
TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf8", ".svs", ".ndpi", ".scn", ".bif"})


class SlideError(ValueError):
    """A slide that cannot be read (missing, corrupt, unsupported) or lacks what the caller asked for."""


@dataclass(frozen=True)
class ReadPlan:
    """How regions at a working resolution map onto the slide.

    level: pyramid level read; scale: level pixels per working pixel (1.0 means no resampling);
    mpp: microns per working pixel; size: (width, height) of the whole slide in working pixels.
    """

    level: int
    scale: float
    mpp: float
    size: tuple[int, int]


class Slide:
    """An open slide: level geometry, microns per pixel, and region reads as (h, w, 3) uint8 RGB.

    Level-0 microns per pixel come from the file's metadata (the backend's, then an OME-TIFF's OME-XML
    PhysicalSizeX), or from `slide_mpp` when given (which overrides the metadata, see `open_slide`). Reads outside the slide are filled with white (glass).
    """

    backend: str = ""
    file_mpp: float | None = None
    """Level-0 microns per pixel as the file records them (None where it does not)."""

    def __init__(self, path: Path, level_dimensions, level_downsamples, mpp: float | None):
        self.path = path
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in level_downsamples)
        self._mpp = mpp

    # -- geometry ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float:
        """Microns per level-0 pixel; a clear error when the slide does not record it."""
        if self._mpp is None:
            raise SlideError(
                f"{self.path.name}: the file records no microns per pixel; "
                "give the slide's resolution explicitly (slide_mpp=..., or --slide-mpp on the command line)"
            )
        return self._mpp

    def plan(self, mpp: float, *, mpp_tolerance: float = 0.02) -> ReadPlan:
        """The level and resampling that give `mpp` microns per pixel (see the module docstring)."""
        if not mpp > 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        factor = mpp / self.mpp  # level-0 pixels per working pixel
        level_mpps = [self.mpp * d for d in self.level_downsamples]
        close = [i for i, m in enumerate(level_mpps) if abs(m / mpp - 1.0) <= mpp_tolerance]
        if close:
            level = min(close, key=lambda i: abs(level_mpps[i] / mpp - 1.0))
            w, h = self.level_dimensions[level]
            return ReadPlan(level=level, scale=1.0, mpp=level_mpps[level], size=(w, h))
        finer = [i for i, d in enumerate(self.level_downsamples) if d <= factor]
        level = max(finer, key=lambda i: self.level_downsamples[i]) if finer else 0
        scale = factor / self.level_downsamples[level]
        w0, h0 = self.dimensions
        size = (max(1, round(w0 / factor)), max(1, round(h0 / factor)))
        return ReadPlan(level=level, scale=scale, mpp=mpp, size=size)

    # -- reading -------------------------------------------------------------------------------
    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels [y, y+height) x [x, x+width) of `level` (level coordinates), white outside the slide."""
        out = np.full((height, width, 3), 255, np.uint8)
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, lw), min(y + height, lh)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read(self, plan: ReadPlan, x: int, y: int, width: int, height: int) -> np.ndarray:
        """A (height, width, 3) uint8 region at the working resolution of `plan`, origin (x, y) in working pixels."""
        if plan.scale == 1.0:
            return self.read_level(plan.level, x, y, width, height)
        s = plan.scale
        lx0, ly0 = math.floor(x * s), math.floor(y * s)
        lx1, ly1 = math.ceil((x + width) * s), math.ceil((y + height) * s)
        src = Image.fromarray(self.read_level(plan.level, lx0, ly0, lx1 - lx0, ly1 - ly0))
        box = (x * s - lx0, y * s - ly0, (x + width) * s - lx0, (y + height) * s - ly0)
        resample = Image.Resampling.BOX if s > 1 else Image.Resampling.BILINEAR
        return np.asarray(src.resize((width, height), resample=resample, box=box))

    def thumbnail(self, max_side: int) -> np.ndarray:
        """The whole slide as (h, w, 3) uint8 with its longer side at most `max_side` pixels."""
        w0, h0 = self.dimensions
        factor = max(w0, h0) / max_side
        if factor <= 1:
            return self.read_level(0, 0, 0, w0, h0)
        size = (max(1, round(w0 / factor)), max(1, round(h0 / factor)))
        finer = [i for i, d in enumerate(self.level_downsamples) if d <= factor]
        level = max(finer, key=lambda i: self.level_downsamples[i]) if finer else 0
        lw, lh = self.level_dimensions[level]
        img = Image.fromarray(self.read_level(level, 0, 0, lw, lh))
        return np.asarray(img.resize(size, resample=Image.Resampling.BOX))

    def _read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self._mpp:g}" if self._mpp is not None else "unknown"
        return f"{type(self).__name__}({self.path.name!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={mpp}, levels={len(self.level_dimensions)})"


def _float_or_none(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


# OME UnitsLength symbols -> microns
_OME_MICRONS = {
    "pm": 1e-6, "Å": 1e-4, "nm": 1e-3, "µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "mm": 1e3, "cm": 1e4, "dm": 1e5, "m": 1e6,
}


def _ome_mpp(path: Path) -> float | None:
    """Microns per pixel from an OME-TIFF's OME-XML (the first image's PhysicalSizeX and its unit, µm by
    default), or None when the file has no OME-XML, no physical size or a unit that is not a length."""
    import xml.etree.ElementTree as ET

    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
        if not xml:
            return None
        root = ET.fromstring(xml)
    except (OSError, ValueError, ET.ParseError, tifffile.TiffFileError):
        return None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    size = _float_or_none(pixels.get("PhysicalSizeX"))
    factor = _OME_MICRONS.get(pixels.get("PhysicalSizeXUnit", "µm"))
    return None if size is None or factor is None else size * factor


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path, handle, slide_mpp: float | None):
        import openslide

        self.file_mpp = _float_or_none(handle.properties.get(openslide.PROPERTY_NAME_MPP_X)) or _ome_mpp(path)
        super().__init__(path, handle.level_dimensions, handle.level_downsamples, slide_mpp or self.file_mpp)
        self._handle = handle

    def _read(self, level, x, y, width, height):
        d = self.level_downsamples[level]
        region = self._handle.read_region((round(x * d), round(y * d)), level, (width, height))
        return as_rgb(np.asarray(region))

    def thumbnail(self, max_side: int) -> np.ndarray:
        return np.asarray(self._handle.get_thumbnail((max_side, max_side)).convert("RGB"))

    def close(self):
        self._handle.close()


class TiffSlideSlide(Slide):
    backend = "tiffslide"

    def __init__(self, path: Path, handle, slide_mpp: float | None):
        self.file_mpp = _float_or_none(handle.properties.get("tiffslide.mpp-x")) or _ome_mpp(path)
        super().__init__(path, handle.level_dimensions, handle.level_downsamples, slide_mpp or self.file_mpp)
        self._handle = handle

    def _read(self, level, x, y, width, height):
        d = self.level_downsamples[level]
        region = self._handle.read_region((round(x * d), round(y * d)), level, (width, height), as_array=True)
        return as_rgb(np.asarray(region))

    def close(self):
        self._handle.close()


class ImageSlide(Slide):
    """A plain image held in memory as a single level."""

    backend = "image"

    def __init__(self, path: Path, pixels: np.ndarray, slide_mpp: float | None, file_mpp: float | None):
        self.file_mpp = file_mpp
        super().__init__(path, [(pixels.shape[1], pixels.shape[0])], [1.0], slide_mpp or file_mpp)
        self._pixels = pixels

    def _read(self, level, x, y, width, height):
        return self._pixels[y : y + height, x : x + width]


def _tiff_mpp(path: Path) -> float | None:
    """Microns per pixel from a TIFF's first page's XResolution and ResolutionUnit (centimetre or inch);
    None for a file that is not a TIFF or has no such tags."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages.first.tags
            xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
            if xres is None or unit is None:
                return None
            numerator, denominator = xres.value
            unit = unit.value
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    res = _float_or_none(numerator / denominator) if denominator else None
    microns = {tifffile.RESUNIT.INCH: 25400.0, tifffile.RESUNIT.CENTIMETER: 10000.0}.get(unit)
    return None if res is None or microns is None else microns / res


def _open_image(path: Path, slide_mpp: float | None) -> ImageSlide:
    """A plain image decoded whole (Pillow's decompression-bomb limit applies: big images belong in TIFF)."""
    with Image.open(path) as img:
        file_mpp = _tiff_mpp(path) if img.format == "TIFF" else None
        pixels = np.asarray(img.convert("RGBA") if "A" in img.getbands() else img.convert("RGB"))
    return ImageSlide(path, as_rgb(pixels), slide_mpp, file_mpp)


def open_slide(path: str | Path, *, slide_mpp: float | None = None, force_slide_mpp: bool = False) -> Slide:
    """Open a whole-slide image or a plain image.

    slide_mpp: microns per level-0 pixel, standing in for missing file metadata, or overriding metadata it
    agrees with within a factor of 2; one that contradicts the file's own by more is a SlideError (a ValueError)
    unless `force_slide_mpp` (the file's metadata is known to be wrong).
    Raises SlideError, naming the file and every backend's complaint, when nothing can read it.
    """
    if slide_mpp is not None:
        slide_mpp = check_positive("slide_mpp", slide_mpp)
    slide = _open(Path(path), slide_mpp)
    try:
        check_slide_mpp(slide_mpp, slide.file_mpp, force=force_slide_mpp)
    except ValueError as err:
        slide.close()
        raise SlideError(f"{slide.path}: {err}") from None
    return slide


def _open(path: Path, slide_mpp: float | None) -> Slide:
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    problems: list[str] = []

    try:
        import openslide
    except ImportError:  # pragma: no cover - the wsi extra is missing
        openslide = None
        problems.append("openslide: not installed (pip install 'fseg_jax[wsi]')")
    vendor = None
    if openslide is not None:
        try:
            vendor = openslide.OpenSlide.detect_format(str(path))
        except Exception as err:  # noqa: BLE001 - the library raises several types for unreadable files
            problems.append(f"openslide: {err}")
        if vendor is not None and vendor != "generic-tiff":
            try:
                return OpenSlideSlide(path, openslide.OpenSlide(str(path)), slide_mpp)
            except Exception as err:  # noqa: BLE001
                problems.append(f"openslide ({vendor}): {err}")

    if path.suffix.lower() in TIFF_SUFFIXES or vendor == "generic-tiff":
        try:
            import tiffslide

            handle = tiffslide.TiffSlide(str(path))
            if len(handle.level_dimensions) > 1 or vendor != "generic-tiff":
                return TiffSlideSlide(path, handle, slide_mpp)
            handle.close()  # a single-level generic tiled TIFF: openslide below
        except ImportError:  # pragma: no cover
            problems.append("tiffslide: not installed (pip install 'fseg_jax[wsi]')")
        except Exception as err:  # noqa: BLE001
            problems.append(f"tiffslide: {err}")
        if vendor == "generic-tiff":
            try:
                return OpenSlideSlide(path, openslide.OpenSlide(str(path)), slide_mpp)
            except Exception as err:  # noqa: BLE001
                problems.append(f"openslide (generic-tiff): {err}")

    try:
        return _open_image(path, slide_mpp)
    except Exception as err:  # noqa: BLE001
        problems.append(f"image: {err}")
    raise SlideError(
        f"{path}: not a readable slide or image ({'; '.join(problems)}); check that the file is complete and in "
        "a supported format (SVS, NDPI, MRXS, SCN, BIF, DICOM, (OME-)TIFF, PNG, JPEG)"
    )
