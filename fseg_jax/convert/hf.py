"""Hugging Face transformers state dicts (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``) ->
``VisionTransformer``.

The same strict accounting as the timm path (``fseg_jax.convert.engine.fill_model``): every source key is
consumed by a rule or ignored by name, every parameter is filled, shapes are checked, all problems are
reported in one ``ConversionError``.

Two key layouts are read: the one the hub ships and ``save_pretrained`` writes (``encoder.layer.N.attention.
attention.query``, ViT's ``intermediate.dense`` / ``output.dense``, DINOv2's packed SwiGLU ``mlp.weights_in``
= gate then up), and the in-memory one of transformers 5 (``attention.q_proj``, ViT's ``layers.N``, ``mlp.fc1``,
SwiGLU ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``) that ``model.state_dict()`` returns. Separate query,
key and value weights are fused into the ``qkv`` of timm's layout. The config says which parameters to expect:
LayerScale (``layer_scale1.lambda1``) only in DINOv2, a packed SwiGLU where its MLP is ``swiglu_packed``,
register tokens where it has some.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fseg_jax.convert.engine import Rule, conv_kernel, fill_model, identity, linear_kernel
from fseg_jax.models.config import ViTConfig

_LAYER = r"(?:vit\.|dinov2\.)?(?:encoder\.layer|layers)\.(\d+)\."
_QKV = ((0, r"attention\.query|q_proj"), (1, r"attention\.key|k_proj"), (2, r"attention\.value|v_proj"))

HF_RULES: tuple[Rule, ...] = (
    (r"(?:vit\.|dinov2\.)?embeddings\.patch_embeddings\.projection\.weight", "patch_embed.kernel", conv_kernel),
    (r"(?:vit\.|dinov2\.)?embeddings\.patch_embeddings\.projection\.bias", "patch_embed.bias", identity),
    (r"(?:vit\.|dinov2\.)?embeddings\.cls_token", "cls_token", identity),
    (r"(?:vit\.|dinov2\.)?embeddings\.register_tokens", "reg_token", identity),
    (r"(?:vit\.|dinov2\.)?embeddings\.position_embeddings", "pos_embed", identity),
    *((_LAYER + rf"attention\.(?:{name})\.weight", r"blocks.\1.attn.qkv.kernel", linear_kernel, (i, 3))
      for i, name in _QKV),
    *((_LAYER + rf"attention\.(?:{name})\.bias", r"blocks.\1.attn.qkv.bias", identity, (i, 3)) for i, name in _QKV),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.weight", r"blocks.\1.attn.proj.kernel", linear_kernel),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.bias", r"blocks.\1.attn.proj.bias", identity),
    # ViTModel (the MLP of the in-memory layout is mlp.fc1 / fc2, as in DINOv2)
    (_LAYER + r"layernorm_before\.weight", r"blocks.\1.norm1.scale", identity),
    (_LAYER + r"layernorm_before\.bias", r"blocks.\1.norm1.bias", identity),
    (_LAYER + r"layernorm_after\.weight", r"blocks.\1.norm2.scale", identity),
    (_LAYER + r"layernorm_after\.bias", r"blocks.\1.norm2.bias", identity),
    (_LAYER + r"intermediate\.dense\.weight", r"blocks.\1.mlp.fc1.kernel", linear_kernel),
    (_LAYER + r"intermediate\.dense\.bias", r"blocks.\1.mlp.fc1.bias", identity),
    (_LAYER + r"output\.dense\.weight", r"blocks.\1.mlp.fc2.kernel", linear_kernel),
    (_LAYER + r"output\.dense\.bias", r"blocks.\1.mlp.fc2.bias", identity),
    # Dinov2Model
    (_LAYER + r"(norm1|norm2)\.weight", r"blocks.\1.\2.scale", identity),
    (_LAYER + r"(norm1|norm2)\.bias", r"blocks.\1.\2.bias", identity),
    (_LAYER + r"layer_scale1\.lambda1", r"blocks.\1.ls1.gamma", identity),
    (_LAYER + r"layer_scale2\.lambda1", r"blocks.\1.ls2.gamma", identity),
    (_LAYER + r"mlp\.(fc1|fc2)\.weight", r"blocks.\1.mlp.\2.kernel", linear_kernel),
    (_LAYER + r"mlp\.(fc1|fc2)\.bias", r"blocks.\1.mlp.\2.bias", identity),
    (_LAYER + r"mlp\.weights_in\.weight", r"blocks.\1.mlp.fc1.kernel", linear_kernel),
    (_LAYER + r"mlp\.weights_in\.bias", r"blocks.\1.mlp.fc1.bias", identity),
    (_LAYER + r"mlp\.weights_out\.weight", r"blocks.\1.mlp.fc2.kernel", linear_kernel),
    (_LAYER + r"mlp\.weights_out\.bias", r"blocks.\1.mlp.fc2.bias", identity),
    (_LAYER + r"mlp\.gate_proj\.weight", r"blocks.\1.mlp.fc1.kernel", linear_kernel, (0, 2)),
    (_LAYER + r"mlp\.gate_proj\.bias", r"blocks.\1.mlp.fc1.bias", identity, (0, 2)),
    (_LAYER + r"mlp\.up_proj\.weight", r"blocks.\1.mlp.fc1.kernel", linear_kernel, (1, 2)),
    (_LAYER + r"mlp\.up_proj\.bias", r"blocks.\1.mlp.fc1.bias", identity, (1, 2)),
    (_LAYER + r"mlp\.down_proj\.weight", r"blocks.\1.mlp.fc2.kernel", linear_kernel),
    (_LAYER + r"mlp\.down_proj\.bias", r"blocks.\1.mlp.fc2.bias", identity),
    # the final LayerNorm (last_hidden_state)
    (r"(?:vit\.|dinov2\.)?layernorm\.weight", "norm.scale", identity),
    (r"(?:vit\.|dinov2\.)?layernorm\.bias", "norm.bias", identity),
)
# the masked-image-modelling token, ViTModel's pooler and classification heads do not shape the patch tokens
HF_IGNORED: tuple[str, ...] = (
    r"(?:vit\.|dinov2\.)?embeddings\.mask_token", r"(?:vit\.|dinov2\.)?pooler\..*", r"classifier\..*",
)


def _register_rows(reg_tokens: int):
    """Dinov2WithRegistersModel adds position embeddings to the class token and patches, then inserts its
    registers: (1, 1 + N, D) -> (1, 1 + R + N, D) with zero rows for the registers, timm's layout."""

    def insert(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[:, :1], np.zeros((1, reg_tokens, a.shape[-1]), a.dtype), a[:, 1:]], axis=1)

    return insert


def convert_hf_state_dict(state_dict: Mapping[str, Any], config: ViTConfig, **model_kwargs):
    """Build the ``VisionTransformer`` of ``config`` with the weights of a transformers ``ViTModel``,
    ``Dinov2Model`` or ``Dinov2WithRegistersModel`` state dict (``config`` from ``ViTConfig.from_hf`` of the
    model's ``config.json``).

    Args:
        state_dict: flat {transformers key: array}; numpy arrays, torch tensors, or a lazy mapping. Not modified.
        config: the architecture the checkpoint is expected to have.
        **model_kwargs: passed to the model constructor (``dtype``, ``attention_impl``).

    Returns:
        A ``VisionTransformer`` whose ``forward_intermediates(x, indices=[i])`` are the patch tokens of
        transformers' ``hidden_states[i + 1]`` (``hidden_states[0]`` is the embedding output), and whose last block
        with ``norm=True`` is ``last_hidden_state``.

    Raises:
        ConversionError: listing every unexpected key, missing parameter and shape mismatch.
    """
    rules = HF_RULES
    if config.reg_tokens:
        rules = tuple((src, dst, _register_rows(config.reg_tokens)) if dst == "pos_embed" else (src, dst, fn, *rest)
                      for src, dst, fn, *rest in HF_RULES)
    return fill_model(state_dict, config, rules, HF_IGNORED, **model_kwargs)
