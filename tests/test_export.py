"""One program for every platform: the pipeline exported with ``jax.export`` on this CPU-only machine carries each
platform's attention, chosen by the platform it is lowered for, not by the machine that traces it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import export

from fseg_jax import Pipeline, VisionTransformer
from fseg_jax.models.config import ViTConfig
from tiny_models import tiny_vit

FORMULATIONS = ("chunked", "batched", "splash", "cudnn")


def _abstract_pipeline(preset: str, **model_kwargs) -> Pipeline:
    """The full-size pipeline of ``preset`` with abstract parameters: shapes and dtypes, no weights in memory."""
    config = ViTConfig.from_preset(preset)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0), **model_kwargs))
    concepts = np.full((16, config.embed_dim), 0.5, np.float32)
    return Pipeline(model=model, concepts=concepts, dtype=jnp.bfloat16)


def _exported_text(pipeline: Pipeline, platforms: tuple[str, ...], batch: int = 2, size: int = 1024) -> str:
    fn, params = pipeline.token_fn()
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    exported = export.export(jax.jit(fn), platforms=platforms)(params, images)
    return exported.mlir_module()


def _attention_in(text: str) -> set[str]:
    return {name for name in FORMULATIONS if f"attention_{name}" in text}


@pytest.mark.parametrize("preset", ["uni", "gigapath"])
def test_full_pipeline_exports_for_tpu_with_splash_attention(preset):
    # 1024 x 1024 tiles at patch 16: 4096 patch tokens + the class token
    text = _exported_text(_abstract_pipeline(preset, param_dtype=jnp.bfloat16), ("tpu",))
    assert "tpu_custom_call" in text  # the Mosaic kernel, lowered
    assert _attention_in(text) == {"splash"}  # no (batch, head) loop of the CPU formulation


@pytest.mark.parametrize("preset", ["uni", "gigapath"])
def test_full_pipeline_exports_for_cuda_without_a_gpu(preset):
    text = _exported_text(_abstract_pipeline(preset, param_dtype=jnp.bfloat16), ("cuda",))
    found = _attention_in(text)
    assert found and found <= {"batched", "cudnn"}, found
    assert "tpu_custom_call" not in text


def test_cpu_export_carries_the_cpu_loop():
    # the same pipeline lowered for the CPU takes the chunked loop: the checks above can tell the two apart
    config = dataclasses.replace(ViTConfig.from_preset("uni"), depth=1)
    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0)))
    pipeline = Pipeline(model=model, concepts=np.full((4, config.embed_dim), 0.5, np.float32))
    assert _attention_in(_exported_text(pipeline, ("cpu",), batch=1, size=512)) == {"chunked"}


@pytest.mark.parametrize("platforms", [("cuda", "cpu"), ("tpu", "cpu")])
def test_a_multi_platform_program_runs_the_cpu_path_here(platforms):
    model = tiny_vit()
    rng = np.random.default_rng(0)
    concepts = rng.uniform(0.1, 1.0, (5, model.config.embed_dim)).astype(np.float32)
    pipeline = Pipeline(model=model, concepts=concepts)
    fn, params = pipeline.token_fn()
    leaves, treedef = jax.tree.flatten(params)  # a serialized program takes plain arrays

    def program(leaves, images):
        return fn(jax.tree.unflatten(treedef, leaves), images)

    images = rng.integers(0, 256, (2, 48, 80, 3), dtype=np.uint8)
    exported = export.export(jax.jit(program), platforms=platforms)(leaves, jax.ShapeDtypeStruct(images.shape, jnp.uint8))
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == platforms
    assert _attention_in(restored.mlir_module()) >= {"chunked"}
    np.testing.assert_allclose(np.asarray(restored.call(leaves, images)), np.asarray(jax.jit(fn)(params, images)),
                               rtol=1e-5, atol=1e-6)
