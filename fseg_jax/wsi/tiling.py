"""A token-aligned tile grid over a slide at its working resolution.

The slide's token grid is global: token (r, c) covers working pixels [r*p, (r+1)*p) x [c*p, (c+1)*p), with
p the model's patch size. Tiles are `tile` x `tile` pixels; the `margin` pixels on each side are context
that is computed and then discarded, so each tile contributes its `core` = tile - 2*margin pixels
(core/p tokens a side) and neighbouring cores abut exactly. Pixels outside the slide are read as glass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TileGrid:
    """Tiles over a (width, height) working-pixel slide; every length in pixels is a multiple of `patch`."""

    width: int
    height: int
    patch: int
    tile: int
    margin: int

    def __post_init__(self):
        p = self.patch
        if self.tile % p or self.margin % p:
            raise ValueError(f"tile ({self.tile}) and margin ({self.margin}) must be multiples of the patch size {p}")
        if self.margin < 0 or self.core <= 0:
            raise ValueError(f"margin {self.margin} leaves no core in a {self.tile} px tile")

    @classmethod
    def for_slide(cls, size: tuple[int, int], *, patch: int, tile: int, margin: int | None = None) -> TileGrid:
        """The grid for a (width, height) slide; margin defaults to 1/16 of the tile, rounded down to patches."""
        if margin is None:
            margin = (tile // 16) // patch * patch
        return cls(width=size[0], height=size[1], patch=patch, tile=tile, margin=margin)

    @property
    def core(self) -> int:
        return self.tile - 2 * self.margin

    @property
    def tokens_hw(self) -> tuple[int, int]:
        """Shape of the slide's token grid (the last row/column may be partly outside the slide)."""
        return -(-self.height // self.patch), -(-self.width // self.patch)

    @property
    def core_tokens(self) -> int:
        return self.core // self.patch

    @property
    def margin_tokens(self) -> int:
        return self.margin // self.patch

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of tiles."""
        h, w = self.tokens_hw
        c = self.core_tokens
        return -(-h // c), -(-w // c)

    def __len__(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def position(self, index: int) -> tuple[int, int]:
        """(row, col) of tile `index` (row-major)."""
        return divmod(index, self.shape[1])

    def read_box(self, index: int) -> tuple[int, int, int, int]:
        """(x, y, width, height) in working pixels of everything tile `index` reads, margins included."""
        r, c = self.position(index)
        return c * self.core - self.margin, r * self.core - self.margin, self.tile, self.tile

    def core_slices(self, index: int) -> tuple[slice, slice]:
        """Token-grid (row, col) slices of tile `index`'s core, clipped to the slide's token grid."""
        r, c = self.position(index)
        n = self.core_tokens
        h, w = self.tokens_hw
        return slice(r * n, min((r + 1) * n, h)), slice(c * n, min((c + 1) * n, w))

    def tiles_with(self, token_mask: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the tiles whose core holds at least one True token of a tokens_hw mask."""
        if token_mask.shape != self.tokens_hw:
            raise ValueError(f"token mask {token_mask.shape} does not match the token grid {self.tokens_hw}")
        rows, cols = self.shape
        n = self.core_tokens
        padded = np.zeros((rows * n, cols * n), bool)
        padded[: token_mask.shape[0], : token_mask.shape[1]] = token_mask
        per_tile = padded.reshape(rows, n, cols, n).any(axis=(1, 3))
        return np.flatnonzero(per_tile.ravel())
