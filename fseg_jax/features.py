"""From RGB pixels to the ReLU'd patch-token grid that F-Seg factorises.

``preprocess`` scales and normalises with the model's mean/std and pads the bottom and right edges by
replication to a multiple of the patch size (as the original F-Seg does), ``token_features`` runs the model to
the requested block(s) and returns the ReLU'd patch grid (prefix tokens, class and registers, are already
dropped by ``forward_intermediates``). Both are pure and traceable, for use inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def padded_size(height: int, width: int, patch_size: int, bucket: int | None = None) -> tuple[int, int]:
    """The size an image is padded to: the next multiple of ``bucket`` pixels (``patch_size`` when None).

    ``bucket`` must be a multiple of ``patch_size``; a coarser bucket makes images of nearby sizes share one
    compiled program, at the price of extra padding the model sees.
    """
    step = patch_size if bucket is None else int(bucket)
    if step < 1 or step % patch_size:
        raise ValueError(f"bucket must be a positive multiple of the patch size {patch_size}, got {bucket}")
    return -(-int(height) // step) * step, -(-int(width) // step) * step


def preprocess(images_bhw3: jax.Array, config, *, size: tuple[int, int] | None = None) -> jax.Array:
    """Scale, normalise and pad a batch for the model.

    Args:
        images_bhw3: (B, H, W, 3) uint8 (0..255) or float (0..1) RGB.
        config: the model's config; its ``mean``, ``std`` (0..1 scale) and ``patch_size`` are used.
        size: (H', W') to pad to, each >= the input's and a multiple of the patch size; default: the next
            multiple of the patch size.

    Returns:
        (B, H', W', 3) float32, normalised, bottom/right padded by edge replication.
    """
    images = jnp.asarray(images_bhw3)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got shape {images.shape}")
    _, h, w, _ = images.shape
    p = int(config.patch_size)
    hp, wp = padded_size(h, w, p) if size is None else (int(size[0]), int(size[1]))
    if hp < h or wp < w or hp % p or wp % p:
        raise ValueError(f"cannot pad {h}x{w} to {hp}x{wp}: needs a size >= the image and a multiple of {p}")
    if images.dtype == jnp.uint8:
        # each value's correctly rounded v / 255, as numpy computes it (and the original F-Seg does): XLA would
        # multiply by a rounded 1/255 instead, one unit in the last place off for some values, so that a uint8
        # image and the same image as float32 / 255 would not give the same features
        x = jnp.asarray(_UINT8_TO_UNIT)[images]
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        raise TypeError(
            f"preprocess takes uint8 (0..255) or float (0..1) images, got {images.dtype}; "
            "convert other images with fseg_jax.io.as_rgb"
        )
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)
    x = (x - mean) / std
    if (hp, wp) != (h, w):
        x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    return x


def token_features(model, x_bhwc: jax.Array, layer: int | Sequence[int] = -1) -> jax.Array:
    """ReLU'd patch tokens of block ``layer`` (an index, negative from the end; a list is concatenated).

    Args:
        model: a model with ``forward_intermediates`` (``VisionTransformer``, ``ResNet50``).
        x_bhwc: (B, H, W, 3) float32 from :func:`preprocess`.
        layer: block index, or a list of block indices whose features are concatenated along channels.

    Returns:
        (B, H/p, W/p, D * len(layers)) float32, non-negative.
    """
    layers = layer_list(layer, model)
    grids = model.forward_intermediates(x_bhwc, indices=layers, norm=False)
    feats = grids[0] if len(grids) == 1 else jnp.concatenate(grids, axis=-1)
    return jax.nn.relu(feats.astype(jnp.float32))


def layer_list(layer: int | Sequence[int], model) -> list[int]:
    """``layer`` (an index or a non-empty list of indices) as a list of ints, checked against the model's depth."""
    layers = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
    if not layers or not all(isinstance(i, (int, np.integer)) for i in layers):
        raise ValueError(f"layer must be an int or a non-empty list of ints, got {layer!r}")
    depth = getattr(model.config, "depth", None)
    if depth is not None:
        bad = [int(i) for i in layers if not -depth <= int(i) < depth]
        if bad:
            raise ValueError(
                f"layer {bad} out of range for a model with {depth} blocks; use indices from {-depth} to {depth - 1}"
            )
    return [int(i) for i in layers]
