"""torchvision ResNet-50 up to ``layer3`` in Flax NNX (the original F-Seg CNN feature path).

Bottleneck v1.5 (stride on the 3x3 convolution), batch norm in inference mode. Parameter names follow
torchvision (``conv1``, ``bn1``, ``layer1[0].conv1``...) so that conversion is a table of renames.
Channels-last: images (B, H, W, 3), stage outputs (B, H/s, W/s, C) at strides 4, 8, 16.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from fseg_jax.models.config import ResNetConfig
from fseg_jax.models.vit import take_indices


def _conv(cin: int, cout: int, k: int, stride: int, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
    pad = (k - 1) // 2
    conv = nnx.Conv(cin, cout, kernel_size=(k, k), strides=stride, padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    # drawn in float32 and stored in param_dtype: a random model of a seed is the same model in every dtype
    conv.kernel = nnx.Param(conv.kernel[...].astype(param_dtype))
    return conv


class BatchNorm(nnx.Module):
    """Inference-mode batch norm: (x - mean) / sqrt(var + eps) * scale + bias over the last axis."""

    def __init__(self, channels: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.mean = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.var = nnx.Param(jnp.ones((channels,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        mul = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.eps)
        y = (x.astype(jnp.float32) - self.mean[...]) * mul + self.bias[...]
        return y.astype(x.dtype)


class Bottleneck(nnx.Module):
    def __init__(self, cin: int, width: int, stride: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        cout = 4 * width
        self.conv1 = _conv(cin, width, 1, 1, dtype, param_dtype, rngs)
        self.bn1 = BatchNorm(width, eps)
        self.conv2 = _conv(width, width, 3, stride, dtype, param_dtype, rngs)
        self.bn2 = BatchNorm(width, eps)
        self.conv3 = _conv(width, cout, 1, 1, dtype, param_dtype, rngs)
        self.bn3 = BatchNorm(cout, eps)
        if stride != 1 or cin != cout:
            self.downsample_conv = _conv(cin, cout, 1, stride, dtype, param_dtype, rngs)
            self.downsample_bn = BatchNorm(cout, eps)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: Array) -> Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
        return jax.nn.relu(y + shortcut)


class ResNet50(nnx.Module):
    """torchvision ``resnet50`` stem and stages ``layer1``..``layer3`` (``config.depth`` stages).

    Follows the ViT protocol: ``.config`` (``patch_size`` = output stride 16, ``embed_dim`` = 1024,
    ``mean``/``std``) and ``forward_intermediates(x, indices)`` over the stages. ``dtype`` is the convolutions'
    compute dtype, ``param_dtype`` their kernels' storage dtype (batch-norm statistics stay float32).
    """

    def __init__(self, config: ResNetConfig | None = None, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        config = config or ResNetConfig()
        eps = config.bn_eps
        self.config = config
        self.dtype = dtype
        self.param_dtype = jnp.dtype(param_dtype)
        self.conv1 = _conv(3, 64, 7, 2, dtype, param_dtype, rngs)
        self.bn1 = BatchNorm(64, eps)
        cin = 64
        for s, n_blocks in enumerate(config.stage_blocks):
            width = 64 * 2 ** s
            blocks = []
            for b in range(n_blocks):
                blocks.append(Bottleneck(cin, width, 2 if (s > 0 and b == 0) else 1, eps, dtype=dtype,
                                         param_dtype=param_dtype, rngs=rngs))
                cin = 4 * width
            setattr(self, f"layer{s + 1}", nnx.List(blocks))

    def forward_intermediates(
        self,
        x_bhwc: Float[Array, "b h w 3"],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[Float[Array, "b gh gw c"]]:
        """Stage outputs (after the final ReLU of each stage) as (B, H/s, W/s, C) grids.

        Args:
            x_bhwc: (B, H, W, 3) float images, already normalised; H and W multiples of 16.
            indices: over the stages (layer1..layer3) with timm's meaning: None = all, int n = last n,
                sequence = explicit (negative from the end); ``[-1]`` is layer3, (B, H/16, W/16, 1024).
            norm, return_prefix_tokens: accepted for the ViT protocol; a ResNet has neither a final norm nor
                prefix tokens, so both must be False.
        """
        if norm or return_prefix_tokens:
            raise ValueError("ResNet50 has no final norm and no prefix tokens: norm and return_prefix_tokens must be False")
        b, height, width, channels = x_bhwc.shape
        stride = self.config.patch_size
        if channels != 3 or height % stride or width % stride:
            raise ValueError(f"expected (B, H, W, 3) images with H and W multiples of {stride}, got {x_bhwc.shape}")
        take = take_indices(self.config.depth, indices)
        x = jax.nn.relu(self.bn1(self.conv1(x_bhwc)))
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
        outputs = {}
        for s in range(max(take) + 1):
            for block in getattr(self, f"layer{s + 1}"):
                x = block(x)
            outputs[s] = x
        return [outputs[s] for s in take]
