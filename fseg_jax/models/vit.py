"""timm's pre-norm VisionTransformer in Flax NNX, numerically matching ``timm.models.VisionTransformer``.

Layout is channels-last throughout: images (B, H, W, 3), token grids (B, H/p, W/p, D). Parameters mirror
timm's module names (``blocks[i].attn.qkv``, ``ls1.gamma``, ...) so that conversion is a table of renames.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from fseg_jax.models.attention import IMPLEMENTATIONS, attention
from fseg_jax.models.config import ViTConfig


def take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: None = all, int n = last n, sequence = explicit (negative from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices ({indices}) is out of range (1 to {num_blocks})")
        return list(range(num_blocks - indices, num_blocks))
    taken = []
    for i in indices:
        idx = num_blocks + i if i < 0 else i
        if not 0 <= idx < num_blocks:
            raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
        taken.append(idx)
    if not taken:
        raise ValueError("indices selects no block")
    return taken


def _layer_norm(dim: int, config: ViTConfig, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance, as torch computes it (the fast E[x^2] - E[x]^2 form loses precision on large tokens);
    # statistics in float32 whatever the input, the output in the compute dtype (the next matmul's input)
    return nnx.LayerNorm(dim, epsilon=config.norm_eps, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def _matmul(x: Array, w: Array, dtype, precision) -> Array:
    """``x @ w`` with both operands in the compute dtype ``dtype`` (None: float32) and a float32 result.

    A float32 result is what reaches XLA:CPU's fast bfloat16 path (jax 0.10: 2.5x faster with AVX512_BF16, 5x
    with AMX, than a bfloat16 result); GPUs and TPUs accumulate in float32 either way and fold the cast that
    follows into the matmul's output.
    """
    dtype = dtype or jnp.float32
    return jnp.dot(x.astype(dtype), w.astype(dtype), precision=precision, preferred_element_type=jnp.float32)


class Linear(nnx.Module):
    """``x @ kernel + bias``, kernel (in, out) and bias (out,) as ``nnx.Linear`` stores them, the kernel in
    ``param_dtype`` and the bias in float32: the product by :func:`_matmul`, the bias added in float32, and one
    cast to the compute dtype (the next layer's input, at half the bytes in bfloat16)."""

    def __init__(self, din: int, dout: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
        self.dtype = dtype
        self.precision = precision
        # drawn as nnx.Linear draws them (a float32 kernel, then a key for the zero bias), whatever the storage
        # dtype: a random model of a seed is the same model in every dtype
        kernel = nnx.initializers.lecun_normal()(rngs.params(), (din, dout), jnp.float32)
        self.kernel = nnx.Param(kernel.astype(param_dtype))
        self.bias = nnx.Param(nnx.initializers.zeros(rngs.params(), (dout,), jnp.float32))

    def __call__(self, x: Array) -> Float[Array, "... out"]:
        y = _matmul(x, self.kernel[...], self.dtype, self.precision) + self.bias[...]
        return y.astype(self.dtype or jnp.float32)


def torch_bicubic_matrix(n_in: int, n_out: int, *, antialias: bool = False, offset: float = 0.0) -> np.ndarray:
    """(n_out, n_in) weights of torch's ``interpolate(mode="bicubic", align_corners=False)`` along one axis, as
    ATen's CPU kernels compute them.

    ``offset`` 0 resizes to the size ``n_out``; otherwise the call is the DINOv2 repository's
    ``scale_factor=(n_out + offset) / n_in`` (whose output size is still ``n_out``), which places the source
    samples at ``(i + 0.5) / scale - 0.5``. Without antialiasing: Keys' cubic with a = -0.75, taps past the
    border clamped to the edge. With ``antialias=True`` (``_upsample_bicubic2d_aa``): Keys' cubic with a = -0.5,
    stretched by the scale when shrinking, taps past the border dropped and the row renormalised, and an axis
    that keeps its size left unchanged.
    """
    if offset:
        scale = (n_out + offset) / n_in
        if int(np.floor(n_in * scale)) != n_out:
            raise ValueError(f"scale factor {scale} maps {n_in} to {int(np.floor(n_in * scale))} rows, not {n_out}")
        step = 1.0 / scale
    else:
        step = n_in / n_out
    if antialias:
        return _torch_antialiased_cubic(n_in, n_out, step)
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    real = (np.arange(n_out, dtype=np.float64) + 0.5) * step - 0.5
    base = np.floor(real)
    t = real - base
    weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
    taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, n_in - 1)
    matrix = np.zeros((n_out, n_in), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(n_out), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def _torch_antialiased_cubic(n_in: int, n_out: int, step: float) -> np.ndarray:
    """ATen's ``_compute_index_ranges_weights`` for bicubic with antialiasing; ``step`` is input rows per output row.
    ATen leaves an axis whose size does not change as it is, whatever the scale factor."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float32)
    a = -0.5

    def kernel(x):
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, 0.0))

    support = 2.0 * step if step >= 1.0 else 2.0
    inv = 1.0 / step if step >= 1.0 else 1.0
    matrix = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        center = step * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = kernel((np.arange(lo, hi) - center + 0.5) * inv)
        total = w.sum()
        matrix[i, lo:hi] = w / total if total != 0 else w
    return matrix.astype(np.float32)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patches to tokens: a stride-p convolution written as one matmul.

    ``kernel`` is (p, p, 3, D) (HWIO, as a flax conv would store it, in ``param_dtype``), ``bias`` (D,) float32;
    the tokens are float32 (see :func:`_matmul`).
    """

    def __init__(self, patch_size: int, embed_dim: int, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
        p = patch_size
        init = nnx.initializers.lecun_normal()
        self.patch_size = p
        self.dtype = dtype
        self.precision = precision
        self.kernel = nnx.Param(init(rngs.params(), (p, p, 3, embed_dim), jnp.float32).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((embed_dim,), jnp.float32))

    def __call__(self, x_bhwc: Float[Array, "b h w 3"]) -> Float[Array, "b gh gw d"]:
        b, h, w, c = x_bhwc.shape
        p = self.patch_size
        x = x_bhwc.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, h // p, w // p, p * p * c)
        kernel = self.kernel[...].reshape(p * p * c, -1)
        return _matmul(x, kernel, self.dtype, self.precision) + self.bias[...]


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init_value: float = 1e-5):
        self.gamma = nnx.Param(jnp.full((dim,), init_value, jnp.float32))

    def __call__(self, x: Array) -> Float[Array, "... d"]:
        return x * self.gamma[...]  # float32 (a bfloat16 branch is scaled on its way into the float32 residual)


class Attention(nnx.Module):
    def __init__(self, config: ViTConfig, *, dtype, param_dtype, precision, attention_impl: str, rngs: nnx.Rngs):
        d = config.embed_dim
        self.num_heads = config.num_heads
        self.attention_impl = attention_impl
        self.precision = precision
        self.qkv = Linear(d, 3 * d, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.proj = Linear(d, d, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)

    def __call__(self, x_bnd: Array) -> Float[Array, "b n d"]:
        b, n, d = x_bnd.shape
        h = self.num_heads
        qkv = self.qkv(x_bnd).reshape(b, n, 3, h, d // h)
        out_bnhk = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], implementation=self.attention_impl,
                             precision=self.precision)
        return self.proj(out_bnhk.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> act -> fc2, or SwiGLUPacked: fc1 -> (a, b) halves -> act(a) * b -> fc2."""

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, precision, rngs: nnx.Rngs):
        d, hidden = config.embed_dim, config.mlp_hidden
        self.packed = config.mlp_layer == "swiglu_packed"
        self.act = config.act_layer
        self.fc1 = Linear(d, hidden, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.fc2 = Linear(hidden // 2 if self.packed else hidden, d, dtype=dtype, param_dtype=param_dtype,
                          precision=precision, rngs=rngs)

    def _activation(self, x: Array) -> Array:
        if self.act == "gelu":
            return jax.nn.gelu(x, approximate=False)
        return jax.nn.silu(x)

    def __call__(self, x: Array) -> Float[Array, "... d"]:
        x = self.fc1(x)
        if self.packed:
            a, b = jnp.split(x, 2, axis=-1)
            x = self._activation(a) * b
        else:
            x = self._activation(x)
        return self.fc2(x)


class Block(nnx.Module):
    """A pre-norm block on a float32 residual stream: the attention and MLP branches compute in the compute dtype
    (their matmuls accumulating in float32, :func:`_matmul`) and are added to float32 tokens."""

    def __init__(self, config: ViTConfig, *, dtype, param_dtype, precision, attention_impl: str, rngs: nnx.Rngs):
        d = config.embed_dim
        self.norm1 = _layer_norm(d, config, dtype, rngs)
        self.attn = Attention(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                              attention_impl=attention_impl, rngs=rngs)
        self.ls1 = LayerScale(d) if config.layer_scale else None
        self.norm2 = _layer_norm(d, config, dtype, rngs)
        self.mlp = Mlp(config, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.ls2 = LayerScale(d) if config.layer_scale else None

    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n d"]:
        y = self.attn(self.norm1(x))
        x = x + (self.ls1(y) if self.ls1 is not None else y)
        y = self.mlp(self.norm2(x))
        return x + (self.ls2(y) if self.ls2 is not None else y)


class VisionTransformer(nnx.Module):
    """A timm ``VisionTransformer`` (pre-norm, fused qkv, optional LayerScale / registers / SwiGLUPacked).

    Args:
        config: the architecture (``ViTConfig.from_preset("uni")``).
        rngs: initialisers for random weights (real weights come from ``fseg_jax.load_model``).
        dtype: compute dtype (None = float32). ``jnp.bfloat16`` multiplies bfloat16 operands with float32
            accumulation and results (matmuls and attention products), cast once to bfloat16 for the next layer;
            LayerNorm statistics, the softmax and the residual stream stay float32, and the returned grids are
            bfloat16.
        param_dtype: storage dtype of the matmul kernels (patch embedding, qkv, projection, MLP), float32 by
            default; ``jnp.bfloat16`` halves the model's memory (GigaPath: 2.3 GB instead of 4.5 GB) and, with
            ``dtype=jnp.bfloat16``, computes exactly what the float32-stored model computes in bfloat16. Biases,
            norms, LayerScale, tokens and position embeddings stay float32.
        attention_impl: ``"auto"`` (per backend and dtype: query-chunked on CPU, cuDNN flash attention on
            GPU for bfloat16/float16 and batched query chunks for float32, splash attention on TPU for long
            sequences), or one of ``"chunked"``, ``"batched"``, ``"splash"``, ``"xla"``, ``"cudnn"``
            (see ``fseg_jax.models.attention``).
        precision: matmul precision of a float32 model (``jax.lax.Precision`` or its name). The default,
            ``"highest"``, is true float32 on every backend, as timm computes in float32; ``"default"``
            allows TensorFloat-32 on GPUs (faster, about 1e-3 relative) and bfloat16 passes on TPUs.
            Models computing in bfloat16 ignore it.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
                 attention_impl: str = "auto", precision: str | jax.lax.Precision | None = "highest"):
        if attention_impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention_impl must be one of {', '.join(IMPLEMENTATIONS)}, not {attention_impl!r}")
        d = config.embed_dim
        self.config = config
        self.dtype = dtype
        self.param_dtype = jnp.dtype(param_dtype)
        self.attention_impl = attention_impl
        self.precision = precision
        if dtype is not None and jnp.dtype(dtype) != jnp.float32:
            precision = None
        elif precision is not None:
            try:
                precision = jax.lax.Precision(precision)
            except ValueError:
                raise ValueError(
                    f"precision must be 'default', 'high' or 'highest' (or a jax.lax.Precision), not {precision!r}"
                ) from None
        self.patch_embed = PatchEmbed(config.patch_size, d, dtype=dtype, param_dtype=param_dtype,
                                      precision=precision, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d))) if config.class_token else None
        self.reg_token = nnx.Param(init(rngs.params(), (1, config.reg_tokens, d))) if config.reg_tokens else None
        self.pos_embed = nnx.Param(init(rngs.params(), (1, config.num_pos_tokens, d)))
        self.blocks = nnx.List(
            [Block(config, dtype=dtype, param_dtype=param_dtype, precision=precision,
                   attention_impl=attention_impl, rngs=rngs)
             for _ in range(config.depth)]
        )
        self.norm = _layer_norm(d, config, dtype, rngs)

    def _pos_embed_for(self, grid_h: int, grid_w: int) -> Array:
        """Position embeddings for a (grid_h, grid_w) patch grid, resampled in float32 with the prefix rows
        split off first: like timm's ``resample_abs_pos_embed`` (bicubic with antialias); with
        ``pos_embed_resample="transformers"``, like transformers' ``interpolate_pos_encoding``; with ``"dinov2"``,
        like the DINOv2 repository's (``interpolate_antialias``, ``interpolate_offset``)."""
        cfg = self.config
        pos = self.pos_embed[...]
        n_prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
        gh, gw = cfg.pos_embed_grid
        if (grid_h, grid_w) != (gh, gw):
            grid = grid.reshape(gh, gw, -1).astype(jnp.float32)
            if cfg.pos_embed_resample in ("transformers", "dinov2"):
                options = dict(antialias=cfg.interpolate_antialias, offset=cfg.interpolate_offset)
                rows, cols = torch_bicubic_matrix(gh, grid_h, **options), torch_bicubic_matrix(gw, grid_w, **options)
                grid = jnp.einsum("ih,hwd,jw->ijd", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
            else:
                grid = jax.image.resize(grid, (grid_h, grid_w, grid.shape[-1]), method="cubic", antialias=True)
            grid = grid.reshape(1, grid_h * grid_w, -1)
        return jnp.concatenate([prefix, grid], axis=1) if n_prefix else grid

    def embed(self, x_bhwc: Float[Array, "b h w 3"]) -> Float[Array, "b n d"]:
        """Patch embedding + prefix tokens + position embeddings: (B, H, W, 3) -> (B, prefix + h*w, D) float32."""
        cfg = self.config
        b, height, width, channels = x_bhwc.shape
        p = cfg.patch_size
        if channels != 3 or height % p or width % p:
            raise ValueError(
                f"expected (B, H, W, 3) images with H and W multiples of the patch size {p}, got {x_bhwc.shape}"
            )
        x = self.patch_embed(x_bhwc)
        h, w = height // p, width // p
        x = x.reshape(b, h * w, -1)
        pos = self._pos_embed_for(h, w)
        prefix = []
        if self.cls_token is not None:
            prefix.append(jnp.broadcast_to(self.cls_token[...], (b, 1, cfg.embed_dim)))
        if self.reg_token is not None:
            prefix.append(jnp.broadcast_to(self.reg_token[...], (b, cfg.reg_tokens, cfg.embed_dim)))
        if cfg.no_embed_class:
            x = x + pos
            return jnp.concatenate([*prefix, x], axis=1) if prefix else x
        if prefix:
            x = jnp.concatenate([*prefix, x], axis=1)
        return x + pos

    def forward_intermediates(
        self,
        x_bhwc: Float[Array, "b h w 3"],
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[Float[Array, "b gh gw d"]] | list[tuple[Float[Array, "b gh gw d"], Float[Array, "b m d"]]]:
        """Block outputs as patch grids, with timm's meaning of ``indices``.

        Args:
            x_bhwc: (B, H, W, 3) float images, already normalised; H and W multiples of ``patch_size``.
            indices: None = every block, int n = the last n blocks, sequence = those blocks (negative
                counts from the end). Only the blocks up to the deepest one requested are run.
            norm: apply the final LayerNorm to each output.
            return_prefix_tokens: return (grid, prefix) pairs, prefix (B, num_prefix_tokens, D).

        Returns:
            One (B, H/p, W/p, D) grid per requested block, in the order requested, prefix tokens removed, in
            the compute dtype.
        """
        cfg = self.config
        take = take_indices(cfg.depth, indices)
        b, height, width, _ = x_bhwc.shape
        h, w = height // cfg.patch_size, width // cfg.patch_size
        x = self.embed(x_bhwc)
        outputs: dict[int, Array] = {}
        for i in range(max(take) + 1):
            x = self.blocks[i](x)
            if i in take:
                outputs[i] = self.norm(x) if norm else x
        n_prefix = cfg.num_prefix_tokens
        results = []
        for i in take:
            y = outputs[i].astype(self.dtype or jnp.float32)
            grid = y[:, n_prefix:].reshape(b, h, w, cfg.embed_dim)
            results.append((grid, y[:, :n_prefix]) if return_prefix_tokens else grid)
        return results
