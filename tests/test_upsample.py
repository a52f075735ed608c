"""Per-pixel labels of tile cores: the upsampling of a whole token grid, cut into tiles without seams."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fseg_jax.upsample import upsample, upsample_argmax, upsample_argmax_core


def test_window_is_a_crop_of_the_whole_label_map():
    w = jnp.asarray(np.random.default_rng(0).random((5, 7, 4), np.float32))
    whole = np.asarray(upsample_argmax(w, (40, 56)))
    part = np.asarray(upsample_argmax(w, (40, 56), window=(3, 10, 20, 31)))
    np.testing.assert_array_equal(part, whole[3:23, 10:41])
    with pytest.raises(ValueError, match="inside"):
        upsample_argmax(w, (40, 56), window=(30, 0, 20, 8))


@pytest.mark.parametrize("margin", [1, 2])
def test_cores_of_overlapping_tiles_tile_the_whole_label_map(margin):
    """Tiles of 2 margin + 3 tokens a side, cores abutting: their core labels are the whole grid's labels."""
    rng = np.random.default_rng(1)
    scale, core = 8, 3
    grid = rng.random((2 * core + 2 * margin, 2 * core + 2 * margin, 6)).astype(np.float32)
    whole = np.asarray(upsample_argmax(jnp.asarray(grid), (grid.shape[0] * scale, grid.shape[1] * scale)))
    tile = core + 2 * margin
    for r in range(2):
        for c in range(2):
            w = jnp.asarray(grid[r * core : r * core + tile, c * core : c * core + tile])
            labels = np.asarray(upsample_argmax_core(w, scale, margin))
            y0, x0 = (r * core + margin) * scale, (c * core + margin) * scale
            np.testing.assert_array_equal(labels, whole[y0 : y0 + core * scale, x0 : x0 + core * scale])


def test_core_without_margin_is_the_clamped_upsampling():
    w = jnp.asarray(np.random.default_rng(2).random((4, 3, 5), np.float32))
    expected = np.asarray(upsample(w, (32, 24))).argmax(-1)
    np.testing.assert_array_equal(np.asarray(upsample_argmax_core(w, 8, 0)), expected)
