"""The compiled tile step (batch sharded over a device mesh) and the background reader that feeds it."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fseg_jax.options import RESOLUTIONS

# fn(params, images_bhw3_uint8) -> (B, h, w, k) float32 token weights, as built by fseg_jax.segmentation.make_token_fn
TokenFn = Callable[[object, object], object]


class TileStep:
    """One compiled function for batches of tiles: token weights, margins cropped, labels.

    `fn(params, images)` returns the (B, h, w, k) concept weights, or a tuple (per-concept scores (B, h, w, k),
    component weights (B, h, w, m), component -> concept map (B, m)) (``Pipeline.tile_fn`` for "factorize"):
    then the labels are the components' mapped to concepts, and the scores are the weights kept.

    resolution "pixel" (F-Seg's rule): each tile's weights are upsampled bilinearly by the patch size and
    argmaxed per pixel, using one context token beyond the core on each side so that neighbouring cores
    meet without a seam (`fseg_jax.upsample.upsample_argmax_core`); "token": the argmax per token.

    The batch axis is sharded over a 1-D mesh of `devices` (all local devices by default) and the
    parameters are replicated. A batch of n tiles is padded to the next power of two of tiles per device
    (times the device count), at most `batch` (rounded up to a multiple of the device count), by the padding
policy every front end shares (`fseg_jax.segmentation.pad_batch`): a few static
    shapes, so a few compilations, and a slide of 3 tiles is not computed as 16. Calling it with a
    (n, tile, tile, 3) uint8 array returns (labels, weights): labels (n, c p, c p) ("pixel") or (n, c, c)
    ("token"), concept indices in `label_dtype`, c the core tokens a side and p the patch; weights
    (n, c, c, k) float32 or None.
    """

    def __init__(
        self,
        fn: TokenFn,
        params,
        *,
        batch: int,
        patch: int,
        margin_tokens: int,
        core_tokens: int,
        label_dtype,
        resolution: str = "pixel",
        with_weights: bool = False,
        devices: Sequence | None = None,
    ):
        import jax
        import jax.numpy as jnp
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        from fseg_jax.compilation import compiler_options
        from fseg_jax.upsample import upsample_argmax_core

        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
        if not devices and devices is not None:
            raise ValueError("devices must name at least one device, got an empty list; leave it unset for all")
        devices = list(jax.local_devices() if devices is None else devices)
        n_dev = len(devices)
        self.devices = devices
        self.batch = -(-batch // n_dev) * n_dev
        mesh = Mesh(np.asarray(devices), ("batch",))
        self._in_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._params = jax.device_put(params, replicated)
        m, c = margin_tokens, core_tokens
        out_dtype = jnp.dtype(label_dtype)

        def step(params, images):
            out = fn(params, images)
            scores, w, mapping = out if isinstance(out, tuple) else (out, out, None)
            if resolution == "pixel":
                labels = jax.vmap(lambda w_hwm: upsample_argmax_core(w_hwm, patch, m))(w)
            else:
                labels = w[:, m : m + c, m : m + c, :].argmax(axis=-1)
            if mapping is not None:  # component labels -> concepts, per tile
                labels = jax.vmap(lambda labels_hw, mapping_m: mapping_m[labels_hw])(labels, mapping)
            labels = labels.astype(out_dtype)
            return (labels, scores[:, m : m + c, m : m + c, :]) if with_weights else (labels,)

        self._step = jax.jit(step, in_shardings=(replicated, self._in_sharding), out_shardings=self._in_sharding,
                             compiler_options=compiler_options())
        self.with_weights = with_weights

    def padded_size(self, n: int) -> int:
        """The batch size `n` tiles are computed as (`fseg_jax.segmentation.padded_batch_size`)."""
        from fseg_jax.segmentation import padded_batch_size

        return padded_batch_size(n, self.batch, len(self.devices))

    def dispatch(self, images: np.ndarray):
        """Start the step on one batch without waiting; `collect` turns the handle into numpy arrays."""
        import jax

        n = images.shape[0]
        if n > self.batch:
            raise ValueError(f"batch of {n} tiles exceeds the step's batch size {self.batch}")
        from fseg_jax.segmentation import pad_batch

        images = pad_batch(images, self.batch, len(self.devices))
        return n, self._step(self._params, jax.device_put(images, self._in_sharding))

    @staticmethod
    def collect(handle) -> tuple[np.ndarray, np.ndarray | None]:
        """(labels, weights) of a batch started by `dispatch`, waiting for it; see the class docstring."""
        n, out = handle
        labels = np.asarray(out[0])[:n]
        weights = np.asarray(out[1])[:n] if len(out) > 1 else None
        return labels, weights


class DeviceMemoryError(RuntimeError):
    """The device has too little memory for the tile step's batch of tiles."""


@contextlib.contextmanager
def explain_out_of_memory(batch: int, tile: int, devices: int) -> Iterator[None]:
    """Turn XLA's out-of-memory error (RESOURCE_EXHAUSTED) inside the block into a `DeviceMemoryError` that
    says which smaller `batch` (or, at one tile a device, `tile`) to try."""
    from jax.errors import JaxRuntimeError

    try:
        yield
    except JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        what = f"a batch of {batch} tiles of {tile} px"
        if batch > devices:
            half = max(devices, batch // 2)
            hint = f"try half the batch, --batch {half} (batch={half})"
        else:
            hint = f"try a smaller tile, e.g. --tile {tile // 2} (tile={tile // 2})"
        raise DeviceMemoryError(f"the device ran out of memory computing {what}: {hint}") from err


def prefetch_batches(
    batches: Iterable[Sequence[int]],
    read: Callable[[int], np.ndarray],
    *,
    workers: int = 4,
    depth: int = 2,
) -> Iterator[tuple[Sequence[int], np.ndarray, float]]:
    """Read tiles in a thread pool, `depth` batches ahead of the consumer.

    Yields (tile indices, stacked tiles, seconds the consumer waited for this batch) in order. Reading
    (decoding, resampling) releases the GIL in the slide libraries, so threads overlap it with compute.
    """
    import time

    pending: collections.deque = collections.deque()
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fseg-read") as pool:

        def submit() -> bool:
            ids = next(it, None)
            if ids is None:
                return False
            pending.append((ids, [pool.submit(read, i) for i in ids]))
            return True

        try:
            for _ in range(depth + 1):
                if not submit():
                    break
            while pending:
                ids, futures = pending.popleft()
                t0 = time.perf_counter()
                tiles = np.stack([f.result() for f in futures])
                waited = time.perf_counter() - t0
                submit()
                yield ids, tiles, waited
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
