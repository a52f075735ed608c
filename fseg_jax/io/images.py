"""Turn what users pass as "an image" into RGB arrays the pipeline can stack, with one clear error otherwise.

Accepted for one image:

- a NumPy (or JAX) array, channels last: ``(H, W, 3)`` RGB; ``(H, W)`` or ``(H, W, 1)`` grayscale (replicated to
  three channels); ``(H, W, 4)`` RGBA or ``(H, W, 2)`` grayscale + alpha (composited over white, the colour of
  glass in a bright-field slide, and the alpha dropped);
- dtypes: ``uint8`` (0..255), ``uint16`` (0..65535, scaled to float 0..1), floats in ``[0, 1]`` (kept as float32);
  NaN or infinite values, floats outside ``[0, 1]``, booleans and other integer types are refused;
- a ``PIL.Image.Image`` of any mode Pillow can convert (palette, CMYK, 16-bit grayscale ``I;16`` ...), with the
  same conversions (16-bit grayscale keeps its precision as float32; Pillow itself reads 16-bit RGB PNGs as
  8-bit RGB, keeping the high byte of each channel);
- a path (``str`` or ``os.PathLike``) to a file Pillow can read.

The result is a new array or the caller's own array untouched: nothing here writes into an input.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np

_FLOAT_SLACK = 1e-6  # floats this far outside [0, 1] are rounding noise and get clipped


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file into an ``(H, W, 3)`` array (uint8, or float32 in [0, 1] for 16-bit files)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return _from_pil(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}") from None
    except UnidentifiedImageError:
        raise ValueError(f"cannot read {os.fspath(path)} as an image (format not recognised)") from None
    except OSError as err:
        if err.errno is not None:  # the file system's own error (permission, ...), which names the file
            raise
        raise ValueError(f"cannot read {os.fspath(path)}: {err} (the file is damaged or incomplete)") from None


def as_rgb(image: Any, *, name: str = "image") -> np.ndarray:
    """One image (array, PIL image or path) as ``(H, W, 3)`` uint8 or float32 in [0, 1]; see the module docs."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if _is_pil(image):
        return _from_pil(image)
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise TypeError(f"{name}: expected an array, a PIL image or a path, got {type(image).__name__}")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(
            f"{name}: expected an (H, W, 3) RGB image (or (H, W) gray, (H, W, 4) RGBA), got shape {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {arr.shape}")
    arr = _checked_values(arr, name)
    return _to_three_channels(arr)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """An ``(H, W, 3)`` image from :func:`as_rgb` as uint8 (floats are scaled by 255 and rounded)."""
    if image.dtype == np.uint8:
        return image
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def collect_images(images: Any) -> tuple[list[np.ndarray], str]:
    """Normalise the ``images`` argument of :func:`fseg_jax.segment`.

    Returns the images as a list of ``(H, W, 3)`` arrays and how they came: ``"single"`` (one image),
    ``"batch"`` (a ``(B, H, W, C)`` array) or ``"list"`` (a list or tuple of images, sizes may differ).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: empty list")
        return [as_rgb(im, name=f"images[{i}]") for i, im in enumerate(images)], "list"
    if hasattr(images, "shape") and hasattr(images, "dtype") and np.ndim(images) == 4:
        if images.shape[0] == 0:
            raise ValueError("images: empty batch")
        return [as_rgb(im, name=f"images[{i}]") for i, im in enumerate(images)], "batch"
    if isinstance(images, Iterable) and not hasattr(images, "shape") and not _is_pil(images) and not isinstance(
        images, (str, bytes, os.PathLike)
    ):
        raise TypeError(f"images: expected an image, a (B, H, W, 3) array or a list, got {type(images).__name__}")
    return [as_rgb(images)], "single"


def over_white(image: np.ndarray) -> np.ndarray:
    """An image with alpha as the last channel, ``(H, W, 4)`` or ``(H, W, 2)``, composited over white (the
    colour of glass), alpha dropped: uint8 rounded to uint8, float in [0, 1] as float32."""
    color, alpha = image[..., :-1], image[..., -1:]
    if image.dtype == np.uint8:
        if np.all(alpha == 255):
            return np.ascontiguousarray(color)
        a = alpha.astype(np.float32) / 255.0
        return np.round(color.astype(np.float32) * a + 255.0 * (1.0 - a)).astype(np.uint8)
    return (color * alpha + (1.0 - alpha)).astype(np.float32)


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a core dependency
        return False
    return isinstance(obj, Image.Image)


def _from_pil(im) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (Pillow's "I;16", or "I" holding 16-bit values): keep the precision as float 0..1
        arr = np.asarray(im, dtype=np.int64)
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise ValueError(f"unsupported {mode!r} image: values outside the 16-bit range 0..65535")
        gray = (arr / 65535.0).astype(np.float32)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        return as_rgb(np.asarray(im, dtype=np.float32))
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        return as_rgb(np.asarray(im.convert("RGBA")))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def _checked_values(arr: np.ndarray, name: str) -> np.ndarray:
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr.astype(np.float32) / 65535.0).astype(np.float32)
    if kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: contains NaN or infinite values; replace them (e.g. np.nan_to_num) first")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
            raise ValueError(
                f"{name}: float images must hold values in [0, 1], got [{lo:g}, {hi:g}] "
                "(pass uint8 for 0..255 values)"
            )
        return np.clip(arr, 0.0, 1.0).astype(np.float32)
    raise TypeError(f"{name}: unsupported dtype {arr.dtype} (use uint8, uint16 or float in [0, 1])")


def _to_three_channels(arr: np.ndarray) -> np.ndarray:
    c = arr.shape[-1]
    if c == 3:
        return arr
    if c in (2, 4):
        arr = over_white(arr)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr
