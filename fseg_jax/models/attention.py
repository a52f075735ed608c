"""Softmax attention for the ViT blocks: memory-bounded on CPU, cuDNN flash attention on GPU.

On CPU the fastest XLA formulation measured is heads-first ((B, H, N, K) einsums) with the queries split in
chunks mapped sequentially (``lax.map``): per chunk only a (B, H, chunk, N) score block lives in memory, so
a 5000-token image needs megabytes instead of a 1.5 GB score matrix, and the chunks stay cache-friendly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

QUERY_CHUNK = 256
"""Queries per chunk of the CPU path (sequences no longer than this are computed in one block)."""


def _scores_softmax_values(q_bhqk: Array, k_bhnk: Array, v_bhnk: Array) -> Array:
    s = jnp.einsum("bhqk,bhnk->bhqn", q_bhqk, k_bhnk, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, axis=-1).astype(v_bhnk.dtype)
    return jnp.einsum("bhqn,bhnk->bhqk", p, v_bhnk, preferred_element_type=jnp.float32).astype(v_bhnk.dtype)


def chunked_attention(q_bnhk: Array, k_bnhk: Array, v_bnhk: Array, *, chunk: int = QUERY_CHUNK) -> Array:
    """Exact softmax attention, heads-first, queries in chunks of ``chunk``: (B, N, H, K) -> (B, N, H, K)."""
    b, n, h, dk = q_bnhk.shape
    scale = dk ** -0.5
    q = (q_bnhk * jnp.asarray(scale, q_bnhk.dtype)).transpose(0, 2, 1, 3)
    k = k_bnhk.transpose(0, 2, 1, 3)
    v = v_bnhk.transpose(0, 2, 1, 3)
    if n <= chunk:
        out = _scores_softmax_values(q, k, v)
    else:
        n_chunks = -(-n // chunk)
        q = jnp.pad(q, ((0, 0), (0, 0), (0, n_chunks * chunk - n), (0, 0)))
        q_chunks = q.reshape(b, h, n_chunks, chunk, dk).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qc: _scores_softmax_values(qc, k, v), q_chunks)
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, n_chunks * chunk, dk)[:, :, :n]
    return out.transpose(0, 2, 1, 3)


def attention(q_bnhk: Array, k_bnhk: Array, v_bnhk: Array, *, implementation: str = "auto") -> Array:
    """Multi-head softmax attention with scale K**-0.5, no mask: (B, N, H, K) inputs -> (B, N, H, K).

    ``implementation``: ``"chunked"`` (see ``chunked_attention``), ``"xla"`` or ``"cudnn"``
    (``jax.nn.dot_product_attention``), or ``"auto"``: cuDNN when the default backend is a GPU and the
    inputs are bfloat16/float16, chunked otherwise.
    """
    if implementation == "auto":
        low_precision = q_bnhk.dtype in (jnp.bfloat16, jnp.float16)
        implementation = "cudnn" if low_precision and jax.default_backend() == "gpu" else "chunked"
    if implementation == "chunked":
        return chunked_attention(q_bnhk, k_bnhk, v_bnhk)
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q_bnhk, k_bnhk, v_bnhk, implementation=implementation)
    raise ValueError(f"unknown attention implementation {implementation!r}")
