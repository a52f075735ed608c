"""timm / torchvision state dicts -> Flax NNX models: one table of key rules, one place for layout transforms.

The conversion is strict both ways: every source key is consumed by a rule or ignored by name (the
classifier head, ResNet stages past ``layer3``), every model parameter is filled, every shape is checked,
and all problems are reported together in one ``ConversionError``.

The state dict may be any mapping {name: array}: numpy arrays, torch tensors, or a lazy mapping that
reads each tensor on access (``fseg_jax.convert.checkpoint.open_checkpoint``); each tensor is fetched
once, converted to float32 and placed in the model before the next is read, so peak memory stays near
the model's own size plus one tensor.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fseg_jax.models import build_model
from fseg_jax.models.config import ResNetConfig, ViTConfig


class ConversionError(ValueError):
    """A checkpoint does not match the architecture; ``problems`` lists every mismatch found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.summary = message
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)


# layout transforms (torch -> flax)
def identity(a: np.ndarray) -> np.ndarray:
    return a


def linear_kernel(a: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out)."""
    return a.T


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """torch conv weight OIHW -> flax HWIO."""
    return a.transpose(2, 3, 1, 0)


Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Transform] | tuple[str, str, Transform, tuple[int, int]]

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


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy/jax array or torch tensor -> float32 numpy (torch bfloat16 has no numpy twin: go via float)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abstract_model(config, **model_kwargs):
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), **model_kwargs))


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


NATIVE_RULES: tuple[Rule, ...] = ((r"(.+)", r"\1", identity),)
"""fseg_jax's own format (``fseg_jax.save_model``): keys are the dotted NNX parameter paths."""


def fill_model(state_dict: Mapping[str, Any], config, rules: tuple[Rule, ...], ignored: tuple[str, ...] = (),
               **model_kwargs):
    """The model of ``config`` with parameters taken from ``state_dict`` through ``rules``, strictly.

    ``rules`` map source keys (full regex match) to dotted NNX paths with a layout transform; a rule with a
    fourth element ``(index, count)`` fills that slice of ``count`` equal parts along the parameter's last axis
    (separate query, key and value weights fused into one ``qkv``). Keys matching ``ignored`` are skipped by
    name. Every other key, every unfilled parameter or part and every shape mismatch is collected into one
    ``ConversionError``.
    """
    model = _abstract_model(config, **model_kwargs)
    graphdef, state = nnx.split(model)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    targets = {_dotted(path): path for path in flat}
    compiled = [(re.compile(rule[0]), *rule[1:]) for rule in rules]
    ignored_re = [re.compile(p) for p in ignored]

    unexpected, mismatched, filled = [], [], {}
    parts: dict[str, dict[int, np.ndarray | None]] = {}  # destination -> {part index: value (None: mismatched)}
    part_counts: dict[str, int] = {}
    for key in list(state_dict.keys()):
        if any(p.fullmatch(key) for p in ignored_re):
            continue
        for src, dst, fn, *part in compiled:
            match = src.fullmatch(key)
            if match:
                break
        else:
            unexpected.append(f"unexpected key {key!r}")
            continue
        dest = match.expand(dst)
        if dest not in targets:
            unexpected.append(f"unexpected key {key!r} (the model has no parameter {dest!r})")
            continue
        index, count = part[0] if part else (None, 1)
        if dest in filled or index in parts.get(dest, {}):
            unexpected.append(f"key {key!r} fills {dest!r} a second time")
            continue
        path = targets[dest]
        try:
            value = fn(_to_numpy(state_dict[key]))
        except Exception as err:  # a damaged file can fail on any tensor; report it as a conversion problem
            raise ConversionError(f"cannot read tensor {key!r}: {type(err).__name__}: {err}") from err
        expected = tuple(flat[path].shape)
        if part:
            expected = (*expected[:-1], expected[-1] // count)
        if value.shape != expected:
            what = f"{dest!r} (part {index + 1} of {count})" if part else repr(dest)
            mismatched.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)} -> {what} {expected} expected"
            )
            if part:
                value = None  # kept as a placeholder: reported here, not again as a missing part
            else:
                filled[dest] = False  # reported as a mismatch, not again as missing
                continue
        if part:
            parts.setdefault(dest, {})[index] = value
            part_counts[dest] = count
            got = parts[dest]
            if len(got) < count or any(v is None for v in got.values()):
                continue
            value = np.concatenate([got[i] for i in range(count)], axis=-1)
            del parts[dest]
        filled[dest] = True
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)  # the model's storage dtype (param_dtype)
        del value
    missing = [
        f"missing key for part {i + 1} of {part_counts[dest]} of parameter {dest!r}"
        for dest, got in parts.items() for i in range(part_counts[dest]) if i not in got
    ]
    missing += [f"missing key for parameter {dest!r}" for dest in targets if dest not in filled and dest not in parts]
    problems = unexpected + mismatched + missing
    if problems:
        raise ConversionError(
            f"checkpoint does not match the {config.name!r} architecture ({len(problems)} problem(s))", problems
        )
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(flat))
    return nnx.merge(graphdef, state)
