"""Small random ViTs for tests, with LayerScale that lets every block move the output.

At timm's default LayerScale (1e-5) a broken attention or MLP changes a block's output by about 1e-5, below
most tolerances; these models draw every gamma from U(0.1, 1) instead. Importable from any test:
``from tiny_models import tiny_config, tiny_vit``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fseg_jax import ViTConfig, VisionTransformer


def tiny_config(**overrides) -> ViTConfig:
    """Patch 8, width 32, 3 blocks of 4 heads, 2 register tokens, a 4x4 stored position grid."""
    base = dict(name="tiny", patch_size=8, embed_dim=32, depth=3, num_heads=4, mlp_hidden=64,
                reg_tokens=2, pos_embed_grid=(4, 4))
    return ViTConfig(**{**base, **overrides})


def perturb_layer_scale(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Set every LayerScale gamma of ``model`` to U(0.1, 1), in place; returns the model."""
    rng = np.random.default_rng(seed)
    for block in model.blocks:
        for scale in (block.ls1, block.ls2):
            if scale is not None:
                scale.gamma[...] = jnp.asarray(rng.uniform(0.1, 1.0, scale.gamma.shape), jnp.float32)
    return model


def tiny_vit(config: ViTConfig | None = None, seed: int = 0, **model_kwargs) -> VisionTransformer:
    """A random ``VisionTransformer`` of ``config`` (default :func:`tiny_config`) with perturbed LayerScale."""
    model = VisionTransformer(config or tiny_config(), rngs=nnx.Rngs(seed), **model_kwargs)
    return perturb_layer_scale(model, seed)
