"""Building a concept bank for any model: k-means over the features of image tiles, as F-Seg prescribes."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from fseg_jax.concepts.bank import ConceptBank, normalise_layer
from fseg_jax.io import iter_images
from fseg_jax.options import BUILD_KS, RUN_DEFAULTS, check_int

DEFAULT_KS = BUILD_KS
def build_concepts(
    model: Any,
    images_or_folder: Any,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    layer: int | Sequence[int] = -1,
    tile: int = 224,
    per_token: bool = False,
    tokens_per_tile: int | None = None,
    tile_filter: Callable[[np.ndarray], bool] | None = None,
    batch: int = RUN_DEFAULTS["batch"],
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> ConceptBank:
    """Build a bank for `model` as F-Seg prescribes: k-means over tile features, one centre matrix per k.

    Args:
        model: a model with ``.config`` and ``forward_intermediates`` (``VisionTransformer``, ``ResNet50``), a
            preset name or a converted model directory (loaded through ``fseg_jax.hub.resolve_model``).
        images_or_folder: a folder (its image files, sorted by name, not recursive), an image path, an
            ``(H, W, 3)`` image, a ``(B, H, W, 3)`` batch, or a list of any of these. Images are read one at a
            time, so memory holds one image and the per-tile features; as ``segment`` reads them (16-bit and
            float images are not quantised to 8 bits).
        ks: the k values of the bank.
        layer: block index (negative from the end), or a list of blocks whose features are concatenated.
        tile: side of the square tiles cut from each image on a non-overlapping grid (a multiple of the
            model's patch size); the border that does not fill a whole tile is left out.
        per_token: cluster every patch token instead of one spatial mean per tile.
        tokens_per_tile: with `per_token`, keep only this many randomly chosen tokens of each tile.
        tile_filter: keep a tile only when ``tile_filter(tile_hw3_uint8)`` is true (e.g. a tissue test).
        batch: tiles per model call.
        seed, n_init, max_iter, tol: k-means settings (see :func:`fseg_jax.kmeans.kmeans`); one seed gives
            one bank.

    Returns:
        ConceptBank with `layer` and ``model``: the preset name or absolute directory the model was loaded from
        (so that ``fseg_jax.segment(images, bank)`` finds it again), else ``model.config.name``. ValueError when
        fewer samples than the largest k are found, or for a bad tile size.
    """
    from fseg_jax.hub import model_source
    from fseg_jax.kmeans import kmeans

    ks = sorted_ks(ks)
    model, layer, x_nd = collect_features(
        model, images_or_folder, layer=layer, tile=tile, per_token=per_token, tokens_per_tile=tokens_per_tile,
        tile_filter=tile_filter, batch=batch, seed=seed, at_least=ks[-1],
    )
    centres = {
        k: kmeans(x_nd, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol).centers for k in ks
    }
    return ConceptBank(centres, model=model_source(model) or getattr(model.config, "name", None), layer=layer)


def sorted_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """The distinct k values of a bank to make, ascending; ValueError unless all are positive integers."""
    out = tuple(sorted({int(k) for k in ks}))
    if not out or out[0] < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    return out


def collect_features(
    model: Any,
    images_or_folder: Any,
    *,
    layer: int | Sequence[int] = -1,
    tile: int = 224,
    per_token: bool = False,
    tokens_per_tile: int | None = None,
    tile_filter: Callable[[np.ndarray], bool] | None = None,
    batch: int = RUN_DEFAULTS["batch"],
    seed: int = 0,
    at_least: int = 1,
) -> tuple[Any, int | tuple[int, ...], np.ndarray]:
    """The samples banks are made from: ``(model, layer, x_nd)`` with x_nd (n, D) float32 ReLU'd features.

    One row per tile (its spatial mean) or, with ``per_token``, per token (``tokens_per_tile`` of them drawn
    per tile with ``seed``); arguments as for :func:`build_concepts`, the model resolved and the layer
    normalised. ValueError when fewer than ``at_least`` samples are found, or for a bad tile size.
    """
    from fseg_jax.hub import resolve_model

    model = resolve_model(model)
    patch = int(model.config.patch_size)
    if tile < patch or tile % patch:
        raise ValueError(f"tile must be a positive multiple of the model's patch size {patch}, got {tile}")
    batch = check_int("batch", batch)
    if tokens_per_tile is not None and (not per_token or tokens_per_tile < 1):
        raise ValueError("tokens_per_tile needs per_token=True and a value >= 1")
    layer = normalise_layer(layer)

    keep = None
    if per_token and tokens_per_tile is not None:
        rng = np.random.default_rng(seed)

        def keep(f_td: np.ndarray) -> np.ndarray:
            return f_td[np.sort(rng.choice(len(f_td), size=min(tokens_per_tile, len(f_td)), replace=False))]

    tiles = _iter_tiles(images_or_folder, tile, tile_filter)
    feats = _tile_features(model, tiles, layer, tile, batch, per_token, keep)
    x_nd = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
    if x_nd.shape[0] < at_least:
        what = "tokens" if per_token else "tiles"
        raise ValueError(
            f"found {x_nd.shape[0]} {what} of {tile}x{tile} px, fewer than the largest k ({at_least}); "
            "give more or larger images, a smaller tile, or smaller k"
        )
    return model, layer, x_nd


def _iter_tiles(images_or_folder: Any, tile: int, tile_filter: Callable | None) -> Iterator[np.ndarray]:
    """Each image's whole tiles, as ``segment`` reads images (uint8, or float32 in [0, 1] for 16-bit and float
    inputs, not quantised); ``tile_filter`` judges each tile as uint8."""
    from fseg_jax.io.images import as_rgb, to_uint8

    for name, item in iter_images(images_or_folder):
        image = as_rgb(item, name=name)
        h, w = image.shape[:2]
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                t = image[y : y + tile, x : x + tile]
                if tile_filter is None or tile_filter(to_uint8(t)):
                    yield t


def _tile_features(
    model: Any,
    tiles: Iterable[np.ndarray],
    layer: Any,
    tile: int,
    batch: int,
    per_token: bool,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Per tile, the spatial mean (1, D) or the tokens (h*w, D) of the ReLU'd features, in tile order.

    ``keep`` (per-token mode) selects the rows of each tile's (h*w, D) block as soon as it is computed, so
    only the kept tokens are held while the remaining tiles stream through the model."""
    import jax.numpy as jnp
    from flax import nnx

    from fseg_jax.compilation import jit
    from fseg_jax.features import preprocess, token_features

    graphdef, state = nnx.split(model)
    layers = list(layer) if isinstance(layer, tuple) else layer

    @jit
    def features(state, tiles_bhw3):
        m = nnx.merge(graphdef, state)
        f_bhwd = token_features(m, preprocess(tiles_bhw3, m.config), layers)
        if per_token:
            return f_bhwd.reshape(f_bhwd.shape[0], -1, f_bhwd.shape[-1])
        return jnp.mean(f_bhwd, axis=(1, 2))[:, None, :]

    out: list[np.ndarray] = []
    buffer: np.ndarray | None = None  # one batch of tiles of one dtype (uint8, or float32 from other inputs)
    n = 0

    def flush():
        nonlocal n
        buffer[n:] = buffer[n - 1]  # the padding policy of every batched front end: copies of the last entry
        f = np.asarray(features(state, buffer))
        out.extend(f[i] if keep is None else keep(f[i]) for i in range(n))
        n = 0

    for t in tiles:
        if buffer is None or t.dtype != buffer.dtype:
            if n:
                flush()
            buffer = np.zeros((batch, tile, tile, 3), t.dtype)
        buffer[n] = t
        n += 1
        if n == batch:
            flush()
    if n:
        flush()
    return out

