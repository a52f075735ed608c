"""Softmax attention for the ViT blocks, one formulation per backend, memory bounded on all of them.

Every formulation computes exact softmax attention with scale K**-0.5 and no mask, (B, N, H, K) in and out:

- ``"chunked"`` (CPU): one (batch, head) pair at a time, its queries in chunks; the chunk is sized from the
  processor's last-level cache (:func:`cpu_block_elements`), so the same code adapts to each CPU.
- ``"batched"`` (GPU float32, TPU short sequences): query chunks across all batch items and heads at once, the
  chunk sized so the score block stays under a fixed memory budget; one chunk when the whole problem fits.
- ``"splash"`` (TPU): Pallas splash attention, the token axis padded to the kernel's block and the padding
  masked through segment ids. ``interpret=True`` runs the same kernel on any backend (for tests).
- ``"xla"`` / ``"cudnn"``: ``jax.nn.dot_product_attention``.

Each block is normalised after the value product: ``(exp(s - max) @ v) / sum``, which reads the (queries, keys)
score block one time fewer than normalising the probabilities first. Measured figures: ``bench/README.md``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

IMPLEMENTATIONS = ("auto", "chunked", "batched", "splash", "xla", "cudnn")

DEFAULT_LAST_LEVEL_CACHE = 32 * 2**20
"""Bytes assumed for the last-level cache where the operating system does not report it."""

BATCHED_BLOCK_ELEMENTS = 2**28
"""Largest score block (float32 elements, 1 GiB) of the ``"batched"`` formulation."""

SPLASH_MIN_TOKENS = 1024
"""On TPU, sequences at least this long use splash attention; shorter ones the batched XLA formulation."""

SPLASH_BLOCK = 128
"""Query and key block of the splash kernel; the token axis is padded to a multiple of it."""


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level cache in bytes (L3, else L2), as the C library reports it."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return int(size)
    return DEFAULT_LAST_LEVEL_CACHE


def cpu_block_elements(cache_bytes: int | None = None) -> int:
    """Float32 elements of one score block on CPU: about half the last-level cache.

    The block is written once and read three times (max, exp and sum, value product), so keeping it in the
    last-level cache keeps those passes out of main memory, and larger blocks amortise the loop's fixed cost
    per step.
    """
    cache = last_level_cache_bytes() if cache_bytes is None else int(cache_bytes)
    return max(2**16, cache // 8)


def _attend(q_qk, k_nk, v_nk, precision):
    """Softmax attention of one block: (..., q, K) queries (already scaled), (..., n, K) keys and values.

    Scores, max and sum are float32 whatever the input dtype; the value product runs in the input dtype with
    float32 accumulation.
    """
    s = jnp.einsum("...qk,...nk->...qn", q_qk, k_nk, precision=precision, preferred_element_type=jnp.float32)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.einsum("...qn,...nk->...qk", e.astype(v_nk.dtype), v_nk, precision=precision,
                     preferred_element_type=jnp.float32)
    return (out / total).astype(v_nk.dtype)


def _equal_chunks(n: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering n with equal chunks of at most ``chunk``: least padding."""
    n_chunks = -(-n // max(int(chunk), 1))
    return n_chunks, -(-n // n_chunks)


def _heads_first(q_bnhk, k_bnhk, v_bnhk):
    """Queries scaled by K**-0.5 and all three moved to (B, H, N, K)."""
    dk = q_bnhk.shape[-1]
    q = (q_bnhk * jnp.asarray(dk**-0.5, q_bnhk.dtype)).transpose(0, 2, 1, 3)
    return q, k_bnhk.transpose(0, 2, 1, 3), v_bnhk.transpose(0, 2, 1, 3)


def chunked_attention(
    q_bnhk: Float[Array, "b n h k"],
    k_bnhk: Float[Array, "b n h k"],
    v_bnhk: Float[Array, "b n h k"],
    *,
    chunk: int | None = None,
    block_elements: int | None = None,
    precision=None,
) -> Float[Array, "b n h k"]:
    """Exact softmax attention for CPUs, heads-first, memory bounded: (B, N, H, K) -> (B, N, H, K).

    A sequential loop over groups of (batch, head) pairs and, inside, a map over query chunks, so that one
    score block of at most ``block_elements`` float32 values (default :func:`cpu_block_elements`) lives at a
    time and stays in the last-level cache. Long sequences: one pair per step, chunks of
    ``block_elements // N`` queries (at least 64; at most ``chunk`` when given), equal sizes for least
    padding. Short ones: all queries of as many pairs as fit in one block; a problem that fits whole is one
    block. Each step's output overwrites its own (already consumed) queries in the loop carry: a fresh
    zero-filled output buffer has no inputs, so XLA would schedule it at the start of the program and keep
    one per block alive.
    """
    b, n, h, dk = q_bnhk.shape
    budget = cpu_block_elements() if block_elements is None else int(block_elements)
    largest = max(64, budget // n) if chunk is None else int(chunk)
    n_chunks, chunk = _equal_chunks(n, min(n, largest))
    pairs = b * h
    n_groups, per_group = _equal_chunks(pairs, max(1, budget // (chunk * n)) if n_chunks == 1 else 1)
    q, k, v = _heads_first(q_bnhk, k_bnhk, v_bnhk)
    if n_groups == 1 and n_chunks == 1:
        return _attend(q, k, v, precision).transpose(0, 2, 1, 3)

    def grouped(a_bhnk, rows):
        a = a_bhnk.reshape(pairs, a_bhnk.shape[2], dk)
        a = jnp.pad(a, ((0, n_groups * per_group - pairs), (0, rows - a.shape[1]), (0, 0)))
        return a.reshape(n_groups, per_group, rows, dk)

    q = grouped(q, n_chunks * chunk).reshape(n_groups, per_group, n_chunks, chunk, dk).swapaxes(1, 2)
    k, v = grouped(k, n), grouped(v, n)

    def one_group(i, q_or_out):
        k_gnk, v_gnk = k[i], v[i]
        out_cgqk = jax.lax.map(lambda q_gqk: _attend(q_gqk, k_gnk, v_gnk, precision), q_or_out[i])
        return q_or_out.at[i].set(out_cgqk)

    out = jax.lax.fori_loop(0, n_groups, one_group, q)  # (groups, chunks, per_group, chunk, K)
    out = out.swapaxes(1, 2).reshape(n_groups * per_group, n_chunks * chunk, dk)[:pairs, :n]
    return out.reshape(b, h, n, dk).transpose(0, 2, 1, 3)


def batched_attention(
    q_bnhk: Float[Array, "b n h k"],
    k_bnhk: Float[Array, "b n h k"],
    v_bnhk: Float[Array, "b n h k"],
    *,
    chunk: int | None = None,
    precision=None,
) -> Float[Array, "b n h k"]:
    """Exact softmax attention for accelerators: query chunks across every batch item and head at once.

    One (B, H, chunk, N) score block lives at a time; ``chunk`` defaults to the most queries whose block
    stays under :data:`BATCHED_BLOCK_ELEMENTS`, so short sequences are one block and long ones a
    ``lax.map`` over a few large, fully parallel blocks.
    """
    b, n, h, dk = q_bnhk.shape
    if chunk is None:
        chunk = max(1, BATCHED_BLOCK_ELEMENTS // (b * h * n))
    q, k, v = _heads_first(q_bnhk, k_bnhk, v_bnhk)
    if n <= chunk:
        return _attend(q, k, v, precision).transpose(0, 2, 1, 3)
    n_chunks, chunk = _equal_chunks(n, chunk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, n_chunks * chunk - n), (0, 0)))
    q_cbhqk = q.reshape(b, h, n_chunks, chunk, dk).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda q_bhqk: _attend(q_bhqk, k, v, precision), q_cbhqk)
    out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, n_chunks * chunk, dk)[:, :, :n]
    return out.transpose(0, 2, 1, 3)


def splash_attention(
    q_bnhk: Float[Array, "b n h k"],
    k_bnhk: Float[Array, "b n h k"],
    v_bnhk: Float[Array, "b n h k"],
    *,
    interpret: bool = False,
) -> Float[Array, "b n h k"]:
    """Exact softmax attention through the Pallas TPU splash kernel: (B, N, H, K) -> (B, N, H, K).

    The token axis is padded to a multiple of :data:`SPLASH_BLOCK`; padded tokens carry segment id 1 and real
    ones 0, so no real query attends to padding. ``interpret=True`` runs the kernel in Pallas' interpreter on
    any backend (slow; for tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, n, h, dk = q_bnhk.shape
    n_pad = -(-n // SPLASH_BLOCK) * SPLASH_BLOCK
    q, k, v = (
        jnp.pad(a, ((0, 0), (0, 0), (0, n_pad - n), (0, 0)))
        for a in _heads_first(q_bnhk, k_bnhk, v_bnhk)
    )
    mask = splash.MultiHeadMask([splash.FullMask((n_pad, n_pad)) for _ in range(h)])
    block = splash.BlockSizes(block_q=SPLASH_BLOCK, block_kv=SPLASH_BLOCK, block_kv_compute=SPLASH_BLOCK)
    kernel = splash.make_splash_mha_single_device(mask, block_sizes=block, interpret=interpret)
    segment = (jnp.arange(n_pad) >= n).astype(jnp.int32)
    segment_ids = splash.SegmentIds(q=segment, kv=segment)
    out = jax.vmap(lambda q_hnk, k_hnk, v_hnk: kernel(q_hnk, k_hnk, v_hnk, segment_ids=segment_ids))(q, k, v)
    return out[:, :, :n].astype(v_bnhk.dtype).transpose(0, 2, 1, 3)


def resolve_implementation(implementation: str, dtype, n_tokens: int, backend: str | None = None) -> str:
    """The formulation ``"auto"`` stands for on ``backend`` (``"cpu"``, ``"gpu"`` / ``"cuda"`` / ``"rocm"``,
    ``"tpu"``; default: JAX's default backend; any other platform: ``"chunked"``).

    GPU: cuDNN flash attention for bfloat16/float16 (where this JAX can trace it; ``"batched"`` otherwise), and
    ``"batched"`` for float32 (cuDNN has no float32 path); TPU: ``"splash"`` from :data:`SPLASH_MIN_TOKENS` tokens,
    ``"batched"`` below; CPU: ``"chunked"``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend() if backend is None else backend
    if backend in ("gpu", "cuda"):
        return "cudnn" if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "batched"
    if backend == "tpu":
        return "splash" if n_tokens >= SPLASH_MIN_TOKENS else "batched"
    return "batched" if backend == "rocm" else "chunked"


def _formulation(implementation: str, q_bnhk, k_bnhk, v_bnhk, precision):
    """One formulation by name, under a named scope (``attention_<name>``) that lowered programs carry."""
    with jax.named_scope(f"attention_{implementation}"):
        if implementation == "chunked":
            return chunked_attention(q_bnhk, k_bnhk, v_bnhk, precision=precision)
        if implementation == "batched":
            return batched_attention(q_bnhk, k_bnhk, v_bnhk, precision=precision)
        if implementation == "splash":
            return splash_attention(q_bnhk, k_bnhk, v_bnhk)
        return jax.nn.dot_product_attention(q_bnhk, k_bnhk, v_bnhk, implementation=implementation)


def _auto_for(platform: str, q_bnhk, k_bnhk, v_bnhk, precision):
    implementation = resolve_implementation("auto", q_bnhk.dtype, q_bnhk.shape[1], platform)
    if implementation == "cudnn":
        # tracing cuDNN attention needs JAX's CUDA support (RuntimeError without it) and a layout cuDNN takes
        # (NotImplementedError otherwise): the batched formulation where either is missing
        try:
            return _formulation("cudnn", q_bnhk, k_bnhk, v_bnhk, precision)
        except (RuntimeError, NotImplementedError):
            implementation = "batched"
    return _formulation(implementation, q_bnhk, k_bnhk, v_bnhk, precision)


def attention(
    q_bnhk: Float[Array, "b n h k"],
    k_bnhk: Float[Array, "b n h k"],
    v_bnhk: Float[Array, "b n h k"],
    *,
    implementation: str = "auto",
    precision=None,
) -> Float[Array, "b n h k"]:
    """Multi-head softmax attention with scale K**-0.5, no mask: (B, N, H, K) inputs -> (B, N, H, K).

    ``implementation``: one of :data:`IMPLEMENTATIONS` (see the module docs). ``"auto"`` picks per platform and
    dtype (:func:`resolve_implementation`) through ``jax.lax.platform_dependent``: the choice follows the platform
    a program is lowered for, not the machine that traces it, so a program exported on a CPU for
    ``platforms=("tpu",)`` carries splash attention, and one exported for several platforms runs each one's
    formulation where it runs. ``precision``: matmul precision of the XLA formulations (``"highest"`` for
    float32 parity on GPU, where the default is TensorFloat-32).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return _formulation(implementation, q_bnhk, k_bnhk, v_bnhk, precision)
    branches = {platform: functools.partial(_auto_for, platform, precision=precision)
                for platform in ("cuda", "rocm", "tpu")}
    cpu = functools.partial(_auto_for, "cpu", precision=precision)  # the CPU loop, also for any other platform
    return jax.lax.platform_dependent(q_bnhk, k_bnhk, v_bnhk, cpu=cpu, default=cpu, **branches)
