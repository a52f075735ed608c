"""Nearest-neighbour reads of label maps: the one place where pixels, tokens and thumbnail cells are matched.

A `LabelSampler` gives the labels at chosen rows and columns of a label map, whether the map is held in
memory, memory-mapped or stored per token; the writers of `outputs` and the overlay read through one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# sample(ys, xs) -> (len(ys), len(xs)) labels at rows ys and columns xs (1-D int arrays) of a label map
LabelSampler = Callable[[np.ndarray, np.ndarray], np.ndarray]


def token_sampler(labels_hw: np.ndarray, patch: int) -> LabelSampler:
    """The pixels of a token-resolution label map, each token a `patch` x `patch` square."""
    h_tok, w_tok = labels_hw.shape

    def sample(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        return labels_hw[np.minimum(ys // patch, h_tok - 1)[:, None], np.minimum(xs // patch, w_tok - 1)[None, :]]

    return sample


def expand_tokens(tokens_hw: np.ndarray, patch: int, shape_hw: tuple[int, int]) -> np.ndarray:
    """The top-left `shape_hw` pixels of a token map, each token a `patch` x `patch` square."""
    return token_sampler(tokens_hw, patch)(np.arange(shape_hw[0]), np.arange(shape_hw[1]))


def array_sampler(labels_hw: np.ndarray, *, read_bytes: int = 2**26) -> LabelSampler:
    """The pixels of a (height, width) label map, in memory or a memory map.

    Rows are read `read_bytes` at a time (whole rows, then the columns asked for are kept), so a sparse
    sample of a memory-mapped map never holds more than that of the full-resolution rows.
    """
    row_bytes = labels_hw.shape[1] * labels_hw.dtype.itemsize
    rows_per_read = max(1, read_bytes // row_bytes)

    def sample(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        out = np.empty((len(ys), len(xs)), labels_hw.dtype)
        for i in range(0, len(ys), rows_per_read):
            out[i : i + rows_per_read] = np.asarray(labels_hw[ys[i : i + rows_per_read]])[:, xs]
        return out

    return sample


def mapped_sampler(sample: LabelSampler, lut: np.ndarray) -> LabelSampler:
    """`sample`'s labels looked up in `lut` (label -> new label), e.g. concepts to their classes."""
    return lambda ys, xs: lut[sample(ys, xs)]


def cell_centres(cells: int, length: int) -> np.ndarray:
    """The pixel (of `length`) under the centre of each of `cells` equal cells spanning it, as indices."""
    return np.minimum((np.arange(cells) + 0.5) * length / cells, length - 1).astype(np.intp)
