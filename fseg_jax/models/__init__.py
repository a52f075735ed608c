"""Feature extractors: timm Vision Transformers and torchvision ResNet-50 in Flax NNX."""

from __future__ import annotations

from flax import nnx


def build_model(config, *, rngs: nnx.Rngs, **model_kwargs):
    """A randomly initialised ``VisionTransformer`` (``ViTConfig``) or ``ResNet50`` (``ResNetConfig``)."""
    from fseg_jax.models.config import ResNetConfig, ViTConfig

    if isinstance(config, ViTConfig):
        from fseg_jax.models.vit import VisionTransformer

        return VisionTransformer(config, rngs=rngs, **model_kwargs)
    if isinstance(config, ResNetConfig):
        from fseg_jax.models.resnet import ResNet50

        return ResNet50(config, rngs=rngs, **model_kwargs)
    raise TypeError(f"config must be a ViTConfig or ResNetConfig, got {type(config).__name__}")


def with_compute_dtype(model, dtype):
    """``model`` (a ``VisionTransformer`` or ``ResNet50``) computing in ``dtype``, e.g. ``jnp.bfloat16``.

    The parameters are shared, not copied, and keep their storage dtype (``param_dtype``); every layer of the returned model casts its
    inputs and weights to ``dtype`` for its matmuls. Casting the parameters alone does not do this: the patch
    embedding of a float32-built model still returns float32, and the whole forward would run in float32.
    """
    if getattr(model, "dtype", None) == dtype:
        return model
    kwargs = {"dtype": dtype, "param_dtype": model.param_dtype}
    for name in ("attention_impl", "precision"):  # ViT-only options, kept as the model was built
        if hasattr(model, name):
            kwargs[name] = getattr(model, name)
    shell = nnx.eval_shape(lambda: build_model(model.config, rngs=nnx.Rngs(0), **kwargs))
    graphdef, _ = nnx.split(shell)
    return nnx.merge(graphdef, nnx.state(model))
