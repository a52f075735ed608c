"""The bfloat16 forward: every matmul multiplies bfloat16 operands into a float32 result (the processors' fast
path), the residual stream stays float32, and parameters stored in bfloat16 compute exactly what float32 ones
compute in bfloat16, at half the memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_models import tiny_config, tiny_vit

from fseg_jax.hub import clear_model_cache, load_model, save_model
from fseg_jax.models import with_compute_dtype
from fseg_jax.models.resnet import ResNet50
from fseg_jax.segmentation import Pipeline

# SwiGLU blocks; the stored position grid is the images' (5 x 7 patches), so no float32 resampling is traced
CONFIG = tiny_config(depth=2, mlp_layer="swiglu_packed", act_layer="silu", mlp_hidden=128, pos_embed_grid=(5, 7))


def _images(seed: int = 0, shape=(2, 40, 56, 3)) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def _dots(jaxpr) -> list:
    """Every dot_general equation of ``jaxpr`` and of the jaxprs nested in it (loops, maps, branches)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _dots(inner)
    return found


@pytest.mark.parametrize("implementation", ["chunked", "batched", "auto"])
def test_every_bfloat16_matmul_has_bfloat16_operands_and_a_float32_result(implementation):
    model = tiny_vit(CONFIG, dtype=jnp.bfloat16, attention_impl=implementation)
    jaxpr = jax.make_jaxpr(lambda x: model.forward_intermediates(x, indices=[-1]))(_images())
    dots = _dots(jaxpr.jaxpr)
    # patch embedding, then per block qkv, two attention products, projection, fc1, fc2 (at least once each
    # where "auto" traces one formulation per platform)
    assert len(dots) >= 1 + CONFIG.depth * 6
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16, jnp.bfloat16], eqn
        assert eqn.outvars[0].aval.dtype == jnp.float32, eqn


def test_float32_matmuls_stay_float32():
    model = tiny_vit(CONFIG)
    jaxpr = jax.make_jaxpr(lambda x: model.forward_intermediates(x, indices=[-1]))(_images())
    for eqn in _dots(jaxpr.jaxpr):
        assert {v.aval.dtype for v in [*eqn.invars, *eqn.outvars]} == {jnp.dtype(jnp.float32)}, eqn


def test_bfloat16_forward_stays_near_float32_on_a_float32_residual_stream():
    reference = tiny_vit(CONFIG)
    x = _images(1)
    expected = np.asarray(reference.forward_intermediates(x, indices=[-1])[0])
    model = with_compute_dtype(reference, jnp.bfloat16)
    tokens = model.embed(x)
    assert tokens.dtype == jnp.float32 and model.blocks[0](tokens).dtype == jnp.float32
    low = model.forward_intermediates(x, indices=[-1])[0]
    assert low.dtype == jnp.bfloat16
    error = np.linalg.norm(np.asarray(low, np.float32) - expected) / np.linalg.norm(expected)
    assert 1e-4 < error < 2e-2  # bfloat16 really ran (8-bit mantissa), with float32 accumulation and residuals


def test_a_random_model_is_the_same_model_in_every_storage_dtype():
    full = tiny_vit(CONFIG)
    half = tiny_vit(CONFIG, param_dtype=jnp.bfloat16)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(full)), nnx.to_flat_state(nnx.state(half))):
        np.testing.assert_array_equal(np.asarray(a.get_value().astype(b.get_value().dtype), np.float32),
                                      np.asarray(b.get_value(), np.float32), err_msg=str(path))


def test_parameters_stored_in_bfloat16_compute_what_float32_ones_compute_in_bfloat16(tmp_path):
    folder = save_model(tiny_vit(CONFIG), tmp_path / "tiny")
    full = load_model(folder)
    half = load_model(folder, param_dtype=jnp.bfloat16)
    flat = nnx.to_flat_state(nnx.state(half))
    kernels = {path: v.get_value().dtype for path, v in flat if path[-1] == "kernel"}
    others = {path: v.get_value().dtype for path, v in flat if path[-1] != "kernel"}
    assert len(kernels) == 1 + 4 * CONFIG.depth and set(kernels.values()) == {jnp.dtype(jnp.bfloat16)}
    assert set(others.values()) == {jnp.dtype(jnp.float32)}  # biases, norms, LayerScale, tokens, positions
    x = _images(2)
    expected = with_compute_dtype(full, jnp.bfloat16).forward_intermediates(x, indices=[-1])[0]
    computed = with_compute_dtype(half, jnp.bfloat16)
    assert computed.param_dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(computed.forward_intermediates(x, indices=[-1])[0], np.float32),
                                  np.asarray(expected, np.float32))
    # in float32 the bfloat16-stored weights are the float32 ones rounded: close, not equal
    assert not np.array_equal(np.asarray(half.forward_intermediates(x)[-1]), np.asarray(full.forward_intermediates(x)[-1]))


def test_pipeline_loads_a_model_for_a_bfloat16_forward_in_bfloat16(tmp_path):
    folder = save_model(tiny_vit(CONFIG), tmp_path / "tiny")
    concepts = np.random.default_rng(0).uniform(0.1, 1, (4, CONFIG.embed_dim)).astype(np.float32)
    clear_model_cache()
    low = Pipeline.create(concepts, model=folder, dtype=jnp.bfloat16)
    assert low.model.param_dtype == jnp.bfloat16
    assert low.model.blocks[0].mlp.fc1.kernel.get_value().dtype == jnp.bfloat16
    assert Pipeline.create(concepts, model=folder).model.param_dtype == jnp.float32  # a float32 run keeps float32
    model = tiny_vit(CONFIG)  # a model object is used as it is
    assert Pipeline.create(concepts, model=model, dtype=jnp.bfloat16).model is model


def test_resnet_parameters_in_bfloat16():
    model = ResNet50(rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert model.conv1.kernel.get_value().dtype == jnp.bfloat16 and model.bn1.scale.get_value().dtype == jnp.float32
    out = with_compute_dtype(model, jnp.bfloat16).forward_intermediates(_images(3, (1, 32, 32, 3)), indices=[-1])[0]
    assert out.shape == (1, 2, 2, 1024) and out.dtype == jnp.bfloat16
