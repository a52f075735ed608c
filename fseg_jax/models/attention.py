"""Softmax attention for the ViT blocks: memory-bounded on CPU, cuDNN flash attention on GPU.

On CPU the fastest XLA formulation measured is heads-first, one (batch, head) pair at a time with the
queries split in chunks, looped sequentially (``lax.fori_loop``, ``lax.map``): only a (chunk, N) score
block lives in memory, so a 5000-token image needs megabytes instead of a 1.5 GB score matrix, and the
blocks stay in cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

QUERY_CHUNK = 256
"""Largest number of queries per chunk on the CPU path. Sequences no longer than this are computed in one
batched block; longer ones one (batch, head) at a time, in query chunks."""


def _scores_softmax_values(q_bhqk: Array, k_bhnk: Array, v_bhnk: Array) -> Array:
    s = jnp.einsum("...qk,...nk->...qn", q_bhqk, k_bhnk, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s, axis=-1).astype(v_bhnk.dtype)
    return jnp.einsum("...qn,...nk->...qk", p, v_bhnk, preferred_element_type=jnp.float32).astype(v_bhnk.dtype)


def chunked_attention(q_bnhk: Array, k_bnhk: Array, v_bnhk: Array, *, chunk: int = QUERY_CHUNK) -> Array:
    """Exact softmax attention, heads-first: (B, N, H, K) -> (B, N, H, K).

    Up to ``chunk`` tokens: one batched (B, H, N, N) block. Beyond: a sequential loop over the B*H
    (batch, head) pairs and, inside, a map over query chunks of at most ``chunk`` (equal sizes, least
    padding), so one (chunk, N) score block lives at a time. At 4881 tokens this measured 0.63 s per ViT-L
    layer against 1.1 s for chunks spanning all heads. Each head's output overwrites its own (already
    consumed) queries in the loop carry: a fresh zero-filled output buffer has no inputs, so XLA schedules
    it at the start of the program and keeps one per block alive (+20 MB per ViT-L block at 4881 tokens).
    """
    b, n, h, dk = q_bnhk.shape
    scale = dk ** -0.5
    q = (q_bnhk * jnp.asarray(scale, q_bnhk.dtype)).transpose(0, 2, 1, 3)
    k = k_bnhk.transpose(0, 2, 1, 3)
    v = v_bnhk.transpose(0, 2, 1, 3)
    if n <= chunk:
        return _scores_softmax_values(q, k, v).transpose(0, 2, 1, 3)
    n_chunks = -(-n // chunk)
    chunk = -(-n // n_chunks)
    q = jnp.pad(q.reshape(b * h, n, dk), ((0, 0), (0, n_chunks * chunk - n), (0, 0)))
    q = q.reshape(b * h, n_chunks, chunk, dk)
    k = k.reshape(b * h, n, dk)
    v = v.reshape(b * h, n, dk)

    def one_head(i, q_or_out):
        k_nk, v_nk = k[i], v[i]
        out_ck = jax.lax.map(lambda q_qk: _scores_softmax_values(q_qk, k_nk, v_nk), q_or_out[i])
        return q_or_out.at[i].set(out_ck)

    out = jax.lax.fori_loop(0, b * h, one_head, q)
    out = out.reshape(b, h, n_chunks * chunk, dk)[:, :, :n]
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
