"""Bilinear upsampling of token weights (torch ``align_corners=False``) and the per-pixel argmax F-Seg takes.

``upsample`` returns the upsampled (H, W, k) array; ``upsample_argmax`` the labels without holding it;
``upsample_argmax_core`` the labels of a tile's core, continuous with the neighbouring tiles, for whole slides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["upsample", "upsample_argmax", "upsample_argmax_core"]


def _phase_taps(scale: int):
    """Bilinear (align_corners=False) taps for an exact integer upscale, one per output phase t in [0, scale).

    Output index q * scale + t samples the input at q + c_t, c_t = (t + 0.5) / scale - 0.5, which lies
    between rows q - 1 and q (c_t < 0) or q and q + 1; in a copy of the input padded by one edge row on each
    side this is rows q + off_t and q + off_t + 1 with weights (a_t, b_t). Edge padding reproduces the
    clamping at the borders.
    """
    t = np.arange(scale, dtype=np.float64)
    c = (t + 0.5) / scale - 0.5
    off = np.where(c < 0, 0, 1)
    frac = np.where(c < 0, 1.0 + c, c)
    return off, (1.0 - frac).astype(np.float32), frac.astype(np.float32)


def _upsample_axis(x, axis: int, scale: int):
    """Bilinear upscale of ``x`` by an integer factor along ``axis`` (torch align_corners=False)."""
    off, a, b = _phase_taps(scale)
    x = jnp.moveaxis(x, axis, 0)
    n = x.shape[0]
    xp = jnp.concatenate([x[:1], x, x[n - 1 :]], axis=0)
    prev, here, nxt = (xp[i : i + n][:, None] for i in range(3))  # (n, 1, ...)
    bshape = (1, scale) + (1,) * (x.ndim - 1)
    first = jnp.asarray(off == 0).reshape(bshape)
    lo = jnp.where(first, prev, here)
    hi = jnp.where(first, here, nxt)
    out = jnp.asarray(a).reshape(bshape) * lo + jnp.asarray(b).reshape(bshape) * hi  # (n, scale, ...)
    return jnp.moveaxis(out.reshape((n * scale,) + x.shape[1:]), 0, axis)


def upsample(w_hwk, size: tuple[int, int]):
    """Bilinear upsampling of (h, w, k) to (H, W, k) = (s h, t w, k), s and t integers.

    Equal (to float rounding) to ``jax.image.resize(w, (H, W, k), method="linear")`` and to torch's
    ``F.interpolate(mode="bilinear", align_corners=False)``. Holds the whole output: for label maps of large
    images use :func:`upsample_argmax`.
    """
    sy, sx = _scales(w_hwk.shape, size)
    return _upsample_axis(_upsample_axis(w_hwk, 1, sx), 0, sy)


def upsample_argmax(w_hwk, size: tuple[int, int], *, window: tuple[int, int, int, int] | None = None):
    """``argmax(upsample(w_hwk, size), -1)`` as int32 (H, W), without ever holding the (H, W, k) array.

    Goes through the k channels one at a time: each channel is upsampled to an (H, W) plane and compared
    with the running maximum, so memory is a few (H, W) planes whatever k is (and on CPU this is several
    times faster than reducing over a minor axis of k). Ties go to the lowest index, as with ``argmax``;
    the result equals the argmax of :func:`upsample` to float rounding.

    window: (top, left, height, width) in pixels of the (H, W) output: only that part of the label map is
    kept, ``upsample_argmax(w_hwk, size)[top:top + height, left:left + width]``.
    """
    h, w, k = w_hwk.shape
    sy, sx = _scales(w_hwk.shape, size)
    top, left, height, width = (0, 0, h * sy, w * sx) if window is None else (int(v) for v in window)
    if not (0 <= top and 0 <= left and height > 0 and width > 0 and top + height <= h * sy and left + width <= w * sx):
        raise ValueError(f"window {window} does not lie inside the {h * sy}x{w * sx} output")
    w_khw = jnp.moveaxis(w_hwk.astype(jnp.float32), -1, 0)

    def step(c, carry):
        best, index = carry
        plane = _upsample_axis(_upsample_axis(w_khw[c], 1, sx), 0, sy)[top : top + height, left : left + width]
        better = plane > best
        return jnp.where(better, plane, best), jnp.where(better, c, index)

    init = (jnp.full((height, width), -jnp.inf, jnp.float32), jnp.zeros((height, width), jnp.int32))
    return jax.lax.fori_loop(0, k, step, init)[1]


def upsample_argmax_core(w_hwk, scale: int, margin: int):
    """Per-pixel labels of the core of a tile's token grid, continuous with the tiles around it.

    w_hwk: (h, w, k) token weights of a tile whose outer `margin` tokens on each side are context; returns
    int32 (scale (h - 2 margin), scale (w - 2 margin)) labels: the argmax of the bilinear upsampling (by the
    integer `scale`, as :func:`upsample`) of the tile's core together with one neighbouring token on each
    side, cropped to the core. Bilinear weights reach at most one token beyond the core, so these labels
    are those of the upsampling of the whole slide's token grid: neighbouring cores meet without a seam.
    With margin 0 there is no neighbour and the tile's edge tokens are repeated (a clamped border).
    """
    h, w, _ = w_hwk.shape
    core_h, core_w = h - 2 * margin, w - 2 * margin
    if margin < 0 or core_h <= 0 or core_w <= 0:
        raise ValueError(f"margin {margin} leaves no core in a {h}x{w} token grid")
    padded = jnp.pad(w_hwk, ((1, 1), (1, 1), (0, 0)), mode="edge")[margin : margin + core_h + 2, margin : margin + core_w + 2]
    size = ((core_h + 2) * scale, (core_w + 2) * scale)
    return upsample_argmax(padded, size, window=(scale, scale, core_h * scale, core_w * scale))


def _scales(shape_hwk, size):
    h, w, _ = shape_hwk
    height, width = int(size[0]), int(size[1])
    if height % h or width % w:
        raise ValueError(
            f"upsampling needs integer factors, got {h}x{w} -> {height}x{width}; pass a multiple of the grid size"
        )
    return height // h, width // w
