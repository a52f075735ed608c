"""timm / torchvision state dicts -> Flax NNX models: the key rules for ``fseg_jax.convert.engine.fill_model``.

Every source key is consumed by a rule or ignored by name (the classifier head, ResNet stages past ``layer3``);
the engine checks every parameter and shape and reports all problems together in one ``ConversionError``.
"""

from __future__ import annotations

from typing import Any, Mapping

from fseg_jax.convert.engine import ConversionError, Rule, conv_kernel, fill_model, identity, linear_kernel
from fseg_jax.models.config import ResNetConfig, ViTConfig


# (source regex, destination template with regex groups, transform); destinations are dotted NNX paths
VIT_RULES: tuple[Rule, ...] = (
    (r"patch_embed\.proj\.weight", "patch_embed.kernel", conv_kernel),
    (r"patch_embed\.proj\.bias", "patch_embed.bias", identity),
    (r"(cls_token|reg_token|pos_embed)", r"\1", identity),
    (r"blocks\.(\d+)\.(norm1|norm2)\.weight", r"blocks.\1.\2.scale", identity),
    (r"blocks\.(\d+)\.(norm1|norm2)\.bias", r"blocks.\1.\2.bias", identity),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight", r"blocks.\1.\2.kernel", linear_kernel),
    (r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.bias", r"blocks.\1.\2.bias", identity),
    (r"blocks\.(\d+)\.(ls1|ls2)\.gamma", r"blocks.\1.\2.gamma", identity),
    (r"norm\.weight", "norm.scale", identity),
    (r"norm\.bias", "norm.bias", identity),
)
VIT_IGNORED: tuple[str, ...] = (r"head\..*",)

RESNET_RULES: tuple[Rule, ...] = (
    (r"conv1\.weight", "conv1.kernel", conv_kernel),
    (r"bn1\.weight", "bn1.scale", identity),
    (r"bn1\.bias", "bn1.bias", identity),
    (r"bn1\.running_mean", "bn1.mean", identity),
    (r"bn1\.running_var", "bn1.var", identity),
    (r"layer(\d)\.(\d+)\.(conv1|conv2|conv3)\.weight", r"layer\1.\2.\3.kernel", conv_kernel),
    (r"layer(\d)\.(\d+)\.(bn1|bn2|bn3)\.weight", r"layer\1.\2.\3.scale", identity),
    (r"layer(\d)\.(\d+)\.(bn1|bn2|bn3)\.bias", r"layer\1.\2.\3.bias", identity),
    (r"layer(\d)\.(\d+)\.(bn1|bn2|bn3)\.running_mean", r"layer\1.\2.\3.mean", identity),
    (r"layer(\d)\.(\d+)\.(bn1|bn2|bn3)\.running_var", r"layer\1.\2.\3.var", identity),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight", r"layer\1.\2.downsample_conv.kernel", conv_kernel),
    (r"layer(\d)\.(\d+)\.downsample\.1\.weight", r"layer\1.\2.downsample_bn.scale", identity),
    (r"layer(\d)\.(\d+)\.downsample\.1\.bias", r"layer\1.\2.downsample_bn.bias", identity),
    (r"layer(\d)\.(\d+)\.downsample\.1\.running_mean", r"layer\1.\2.downsample_bn.mean", identity),
    (r"layer(\d)\.(\d+)\.downsample\.1\.running_var", r"layer\1.\2.downsample_bn.var", identity),
)
# torchvision ResNet-50 checkpoints carry the stages past layer3 and the classifier: not part of this model
RESNET_IGNORED: tuple[str, ...] = (r"fc\..*", r"layer4\..*", r".*\.num_batches_tracked")


def convert_timm_state_dict(state_dict: Mapping[str, Any], config: ViTConfig | ResNetConfig, **model_kwargs):
    """Build the NNX model for ``config`` with the weights of a timm (or torchvision ResNet) state dict.

    Args:
        state_dict: flat {timm key: array}; numpy arrays, torch tensors, or a lazy mapping. Not modified.
        config: the architecture the checkpoint is expected to have.
        **model_kwargs: passed to the model constructor (``dtype``, ``attention_impl`` for ViTs).

    Returns:
        ``VisionTransformer`` (ViTConfig) or ``ResNet50`` (ResNetConfig) with float32 parameters.

    Raises:
        ConversionError: listing every unexpected key, missing parameter and shape mismatch.
    """
    if isinstance(config, ViTConfig):
        return fill_model(state_dict, config, VIT_RULES, VIT_IGNORED, **model_kwargs)
    return fill_model(state_dict, config, RESNET_RULES, RESNET_IGNORED, **model_kwargs)


# The teacher of a DINOv2 training checkpoint (the DINOv2 repository's ``SSLMetaArch``, ``{"teacher": {...}}``): timm's
# key names under ``backbone.``, blocks optionally chunked for FSDP (``blocks.<chunk>.<block>.``, the block index
# running on across chunks), and the training-only DINO head and mask token.
DINOV2_TEACHER_RULES: tuple[Rule, ...] = tuple(
    (r"backbone\." + src.replace(r"blocks\.(\d+)\.", r"blocks\.(?:\d+\.)?(\d+)\."), dst, fn)
    for src, dst, fn in VIT_RULES
)
DINOV2_TEACHER_IGNORED: tuple[str, ...] = (r"backbone\.mask_token", r"dino_head\..*")


def convert_dinov2_teacher_state_dict(checkpoint: Mapping[str, Any], config: ViTConfig, **model_kwargs):
    """Build the ``VisionTransformer`` of ``config`` from a DINOv2 training checkpoint ``{"teacher": state}``
    (GPFM's release), with :data:`DINOV2_TEACHER_RULES` and the strict accounting of :func:`fill_model`.

    Raises:
        ConversionError: the checkpoint holds no ``"teacher"`` state dict, or holds other entries (named), or its
            teacher does not match ``config`` (every problem listed).
    """
    teacher = checkpoint.get("teacher")
    others = sorted(k for k in checkpoint if k != "teacher")
    if not isinstance(teacher, Mapping) or others:
        raise ConversionError(
            "expected a DINOv2 training checkpoint holding only {'teacher': state dict}; "
            f"found {'no teacher state dict' if not isinstance(teacher, Mapping) else 'a teacher'}"
            + (f" and unexpected entries {others}" if others else "")
        )
    return fill_model(teacher, config, DINOV2_TEACHER_RULES, DINOV2_TEACHER_IGNORED, **model_kwargs)
