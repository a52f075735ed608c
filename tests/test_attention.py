"""Every attention formulation against torch's scaled_dot_product_attention, and the choice between them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm_models import random_input, relative_error
from tiny_models import tiny_config, tiny_vit

from fseg_jax import VisionTransformer
from fseg_jax.models import with_compute_dtype
from fseg_jax.models.attention import (
    IMPLEMENTATIONS,
    attention,
    batched_attention,
    chunked_attention,
    cpu_block_elements,
    resolve_implementation,
    splash_attention,
)

# (batch, tokens, heads, head dim): token counts that are not multiples of any chunk or block
SHAPES = [(2, 37, 3, 16), (1, 300, 2, 32), (3, 130, 4, 8)]


def qkv(shape, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape, dtype=np.float32) * scale for _ in range(3))


def torch_attention(q, k, v):
    """torch SDPA on (B, N, H, K) numpy arrays, the reference timm's Attention calls."""
    to = lambda a: torch.from_numpy(np.asarray(a, np.float32)).transpose(1, 2)  # noqa: E731
    return torch.nn.functional.scaled_dot_product_attention(to(q), to(k), to(v)).transpose(1, 2).numpy()


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_attention_matches_torch_for_every_blocking(shape):
    q, k, v = qkv(shape)
    expected = torch_attention(q, k, v)
    b, n, h, _ = shape
    # whole problem in one block; groups of (batch, head) pairs; one pair per step in query chunks
    for chunk, block_elements in [(None, None), (None, n * n), (None, 3 * n * n), (16, None), (64, 10**6),
                                  (None, 64 * n), (7, 7 * n)]:
        out = jax.jit(lambda q, k, v: chunked_attention(q, k, v, chunk=chunk, block_elements=block_elements))(q, k, v)
        chex.assert_shape(out, shape)
        assert relative_error(np.asarray(out), expected) < 3e-6, (chunk, block_elements)


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_and_splash_attention_match_torch(shape):
    q, k, v = qkv(shape, seed=1)
    expected = torch_attention(q, k, v)
    for chunk in (None, 7, 64):
        assert relative_error(np.asarray(batched_attention(q, k, v, chunk=chunk)), expected) < 3e-6
    # the Pallas TPU kernel through its interpreter: padding of the token axis to 128 is masked
    out = splash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), interpret=True)
    chex.assert_shape(out, shape)
    assert relative_error(np.asarray(out), expected) < 1e-5


def test_attention_in_bfloat16_stays_close():
    q, k, v = qkv((2, 150, 2, 16), seed=2, scale=1.0)
    expected = torch_attention(q, k, v)
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    for fn in (chunked_attention, batched_attention):
        out = fn(*bf) if fn is batched_attention else fn(*bf, block_elements=64 * 150)
        assert out.dtype == jnp.bfloat16
        assert relative_error(np.asarray(out, np.float32), expected) < 2e-2


def test_auto_picks_per_backend_and_dtype():
    assert resolve_implementation("auto", jnp.float32, 5000, backend="cpu") == "chunked"
    assert resolve_implementation("auto", jnp.bfloat16, 5000, backend="cpu") == "chunked"
    # float32 on a GPU never takes the sequential CPU loop
    assert resolve_implementation("auto", jnp.float32, 5000, backend="gpu") == "batched"
    assert resolve_implementation("auto", jnp.bfloat16, 5000, backend="gpu") == "cudnn"
    assert resolve_implementation("auto", jnp.bfloat16, 5000, backend="tpu") == "splash"
    assert resolve_implementation("auto", jnp.float32, 197, backend="tpu") == "batched"
    assert resolve_implementation("xla", jnp.float32, 5000, backend="tpu") == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attention(*qkv((1, 4, 1, 4)), implementation="flash")


def test_cpu_blocks_follow_the_cache_size():
    assert cpu_block_elements(32 * 2**20) == 4 * 2**20  # half of a 32 MB cache, in float32 values
    assert cpu_block_elements(128 * 2**20) == 16 * 2**20
    assert cpu_block_elements(1) == 2**16  # a floor for caches reported as tiny


def test_every_cpu_runnable_implementation_gives_the_same_model_output():
    config = tiny_config(depth=2)
    reference = tiny_vit(config, attention_impl="xla")
    state = nnx.state(reference)
    x = random_input(40, 56, batch=2)  # 5 x 7 grid + 3 prefix tokens
    expected = np.asarray(reference.forward_intermediates(x)[-1])
    for impl in ("chunked", "batched", "auto"):
        model = nnx.merge(nnx.split(VisionTransformer(config, rngs=nnx.Rngs(1), attention_impl=impl))[0], state)
        assert relative_error(np.asarray(model.forward_intermediates(x)[-1]), expected) < 1e-5, impl
    assert set(IMPLEMENTATIONS) == {"auto", "chunked", "batched", "splash", "xla", "cudnn"}


def test_precision_is_validated_and_kept_by_compute_dtype_changes():
    config = tiny_config()
    with pytest.raises(ValueError, match="precision must be"):
        VisionTransformer(config, rngs=nnx.Rngs(0), precision="tf32")
    model = VisionTransformer(config, rngs=nnx.Rngs(0), precision="default", attention_impl="batched")
    bf16 = with_compute_dtype(model, jnp.bfloat16)
    assert (bf16.precision, bf16.attention_impl, bf16.dtype) == ("default", "batched", jnp.bfloat16)
    assert bf16.blocks[0].attn.precision is None  # bfloat16 matmuls take no float32 precision
    assert model.blocks[0].attn.precision == jax.lax.Precision.DEFAULT


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU (none on this machine)")
def test_cudnn_attention_matches_torch_on_gpu():
    q, k, v = qkv((2, 300, 4, 64), seed=3, scale=1.0)
    expected = torch_attention(q, k, v)
    out = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), implementation="cudnn")
    assert relative_error(np.asarray(out, np.float32), expected) < 2e-2
