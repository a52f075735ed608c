"""Architecture configs: a frozen dataclass per model family, with named presets for the released checkpoints.

A preset stores the integers of its checkpoint's shapes (e.g. ``mlp_hidden=8192``, the fc1 width), not the float
ratio timm derives them from; a preset whose manifest says ``"verified": false`` (``fseg_jax.models.weights``) has
not yet been checked against the released file. ``ViTConfig.from_timm`` and ``ViTConfig.from_hf`` read a timm or a
transformers ``config.json`` (the parsers live beside the converters, in ``fseg_jax.convert.timm_config`` and
``fseg_jax.convert.hf_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)
HALF = (0.5, 0.5, 0.5)
LUNIT_MEAN = (0.70322989, 0.53606487, 0.66096631)
LUNIT_STD = (0.21716536, 0.26081574, 0.20723464)
HIBOU_MEAN = (0.7068, 0.5755, 0.722)
HIBOU_STD = (0.195, 0.2316, 0.1816)

MLP_LAYERS = ("mlp", "swiglu_packed")
ACT_LAYERS = ("gelu", "silu")
POS_EMBED_RESAMPLES = ("timm", "transformers", "dinov2")


class _DictConfig:
    """``to_dict`` / ``from_dict`` for the config dataclasses (the ``config.json`` of a converted model)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The config with these fields; a key that is not a field is an error naming it."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ViTConfig(_DictConfig):
    """A pre-norm timm ``VisionTransformer`` as used by pathology foundation models.

    Attributes:
        name: preset name (or a free label for custom configs).
        patch_size: side of the square patches, in pixels.
        embed_dim: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads (embed_dim must be a multiple).
        mlp_hidden: width of the MLP's first linear layer (fc1 output). For ``swiglu_packed`` the gated
            half-width ``mlp_hidden // 2`` feeds fc2.
        mlp_layer: ``"mlp"`` (fc1 -> act -> fc2) or ``"swiglu_packed"`` (fc1 -> halves a, b -> act(a) * b -> fc2).
        act_layer: ``"gelu"`` (exact erf form) or ``"silu"``.
        class_token: whether a class token is prepended.
        reg_tokens: number of register tokens (after the class token).
        no_embed_class: position embeddings cover the patches only (prefix tokens get none).
        pos_embed_grid: (rows, cols) of the stored position-embedding grid (img_size // patch_size).
        layer_scale: whether blocks carry LayerScale gammas (timm ``init_values`` not None).
        norm_eps: LayerNorm epsilon.
        pos_embed_resample: how the stored position grid is resized to another patch grid. ``"timm"``:
            timm's ``resample_abs_pos_embed`` (bicubic with antialiasing). ``"transformers"``: the
            ``interpolate_pos_encoding`` of transformers' ``ViTModel`` and ``Dinov2Model`` (torch's bicubic,
            ``align_corners=False``, no antialiasing, resized to the target grid size). ``"dinov2"``: the
            ``interpolate_pos_encoding`` of the DINOv2 repository's ``DinoVisionTransformer`` (torch's bicubic, with
            ``interpolate_antialias`` and ``interpolate_offset``).
        interpolate_antialias: ``"dinov2"`` resampling only: torch's antialiased bicubic kernel.
        interpolate_offset: ``"dinov2"`` resampling only: 0 resizes to the target grid size; otherwise torch is
            given the scale factor ``(grid + offset) / stored grid`` (the DINOv2 repository's default is 0.1).
        mean, std: per-channel input normalisation on the 0..1 scale (RGB).
    """

    name: str
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    mlp_layer: str = "mlp"
    act_layer: str = "gelu"
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pos_embed_grid: tuple[int, int] = (14, 14)
    layer_scale: bool = True
    norm_eps: float = 1e-6
    pos_embed_resample: str = "timm"
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        problems = []
        if self.mlp_layer not in MLP_LAYERS:
            problems.append(f"mlp_layer must be one of {MLP_LAYERS}, got {self.mlp_layer!r}")
        if self.act_layer not in ACT_LAYERS:
            problems.append(f"act_layer must be one of {ACT_LAYERS}, got {self.act_layer!r}")
        if self.pos_embed_resample not in POS_EMBED_RESAMPLES:
            problems.append(f"pos_embed_resample must be one of {POS_EMBED_RESAMPLES}, got {self.pos_embed_resample!r}")
        if self.pos_embed_resample != "dinov2" and (self.interpolate_antialias or self.interpolate_offset):
            problems.append("interpolate_antialias and interpolate_offset apply to pos_embed_resample='dinov2' only")
        if self.interpolate_offset < 0:
            problems.append(f"interpolate_offset must be non-negative, got {self.interpolate_offset}")
        if self.embed_dim % self.num_heads:
            problems.append(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.mlp_layer == "swiglu_packed" and self.mlp_hidden % 2:
            problems.append(f"swiglu_packed needs an even mlp_hidden, got {self.mlp_hidden}")
        if self.depth < 1 or self.patch_size < 1 or self.reg_tokens < 0:
            problems.append("depth and patch_size must be positive and reg_tokens non-negative")
        if problems:
            raise ValueError("invalid ViTConfig: " + "; ".join(problems))
        # normalise list inputs (e.g. from JSON) to tuples so configs compare and hash by value
        object.__setattr__(self, "pos_embed_grid", tuple(int(v) for v in self.pos_embed_grid))
        object.__setattr__(self, "interpolate_offset", float(self.interpolate_offset))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def num_prefix_tokens(self) -> int:
        """Class token plus register tokens: the tokens before the patch grid."""
        return int(self.class_token) + self.reg_tokens

    @property
    def num_pos_tokens(self) -> int:
        """Rows of the stored ``pos_embed`` (prefix tokens included unless ``no_embed_class``)."""
        grid = self.pos_embed_grid[0] * self.pos_embed_grid[1]
        return grid if self.no_embed_class else grid + self.num_prefix_tokens

    @classmethod
    def from_preset(cls, name: str) -> "ViTConfig":
        """The architecture of a released checkpoint: one of ``preset_names()`` but ``"resnet50"``."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown ViT preset {name!r}; available: {', '.join(sorted(_PRESETS))}") from None

    @classmethod
    def from_timm(cls, timm_config: Mapping[str, Any], *, name: str | None = None) -> "ViTConfig":
        """Build a config from a timm hub ``config.json`` (``architecture`` + ``model_args``).

        ``pretrained_cfg`` supplies mean/std when present. Every ``model_args`` key must be one this port
        implements (or one that cannot change the features, such as dropout rates or the classifier head);
        anything else is an error that names the key.
        """
        from fseg_jax.convert.timm_config import vit_config_from_timm

        return vit_config_from_timm(timm_config, name)

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], *, name: str | None = None) -> "ViTConfig":
        """Build a config from a Hugging Face transformers ``config.json`` (``model_type`` ``"vit"``, ``"dinov2"``
        or ``"dinov2_with_registers"``, as saved by ``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel``).

        Position embeddings are resampled as transformers does: ``pos_embed_resample="transformers"`` for ViT and
        DINOv2, timm's antialiased bicubic for DINOv2 with registers (its ``interpolate_pos_encoding`` passes
        ``antialias=True``), whose registers carry no position embedding (``convert_hf_state_dict`` gives them
        zero rows). A ``"dinov2"`` config with an ``auto_map`` naming a custom ``Dinov2Model`` (Hibou's) is read as
        the DINOv2 repository's ViT: ``num_register_tokens``, ``interpolate_antialias`` and ``interpolate_offset``
        are required, and position embeddings are resampled with ``pos_embed_resample="dinov2"``. Mean/std
        are ImageNet's (transformers keeps them in the image processor's config, not here). Every key must be
        one this port implements with the value it implements, or one that cannot change the features
        (dropout rates, initialisation, backbone-head options); anything else is an error that names the key.
        """
        from fseg_jax.convert.hf_config import vit_config_from_hf

        return vit_config_from_hf(hf_config, name)


@dataclass(frozen=True)
class ResNetConfig(_DictConfig):
    """torchvision ResNet-50 up to ``layer3`` (the original F-Seg CNN path): stride 16, 1024 channels.

    ``patch_size`` is the output stride so that callers treat it like a ViT's patch; ``depth`` is the
    number of stages kept (layer1..layer3).
    """

    name: str = "resnet50"
    patch_size: int = 16
    embed_dim: int = 1024
    depth: int = 3
    stage_blocks: tuple[int, ...] = (3, 4, 6)
    bn_eps: float = 1e-5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if len(self.stage_blocks) != self.depth or not 1 <= self.depth <= 4:
            raise ValueError(f"invalid ResNetConfig: depth {self.depth} with stage_blocks {self.stage_blocks}")
        expected_stride, expected_dim = 2 ** (self.depth + 1), 256 * 2 ** (self.depth - 1)
        if (self.patch_size, self.embed_dim) != (expected_stride, expected_dim):
            raise ValueError(
                f"invalid ResNetConfig: {self.depth} stages give stride {expected_stride} and "
                f"{expected_dim} channels, not {self.patch_size} and {self.embed_dim}"
            )
        object.__setattr__(self, "stage_blocks", tuple(int(v) for v in self.stage_blocks))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))


def config_from_preset(name: str) -> ViTConfig | ResNetConfig:
    """Any preset name (ViT or ResNet) to its config."""
    if name == "resnet50":
        return ResNetConfig()
    return ViTConfig.from_preset(name)


def preset_names() -> tuple[str, ...]:
    return tuple(sorted((*_PRESETS, "resnet50")))


# ---------------------------------------------------------------------------------------------------------
# presets: the released checkpoints' architectures (see weights/<name>.json for where the weights live)

_SWIGLU = dict(mlp_layer="swiglu_packed", act_layer="silu")
_PRESETS: dict[str, ViTConfig] = {
    # vit_large_patch16_224, init_values=1e-5
    "uni": ViTConfig("uni", 16, 1024, 24, 16, 4096),
    # vit_giant_patch14_224 with D 1536, depth 24, heads 24, SwiGLUPacked 8192, 8 registers, no_embed_class
    "uni2_h": ViTConfig("uni2_h", 14, 1536, 24, 24, 8192, **_SWIGLU, reg_tokens=8, no_embed_class=True,
                        pos_embed_grid=(16, 16)),
    # vit_giant_patch14_dinov2 with img_size 224, patch 16
    "gigapath": ViTConfig("gigapath", 16, 1536, 40, 24, 8192, **_SWIGLU),
    # vit_huge_patch14_224, mlp_ratio 5.3375, SwiGLUPacked
    "virchow": ViTConfig("virchow", 14, 1280, 32, 16, 6832, **_SWIGLU, pos_embed_grid=(16, 16)),
    # as virchow with 4 registers (position embeddings include the prefix tokens)
    "virchow2": ViTConfig("virchow2", 14, 1280, 32, 16, 6832, **_SWIGLU, reg_tokens=4, pos_embed_grid=(16, 16)),
    # vit_giant_patch14_reg4_dinov2, img_size 224
    "h_optimus_0": ViTConfig("h_optimus_0", 14, 1536, 40, 24, 8192, **_SWIGLU, reg_tokens=4, no_embed_class=True,
                             pos_embed_grid=(16, 16), mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    "h_optimus_1": ViTConfig("h_optimus_1", 14, 1536, 40, 24, 8192, **_SWIGLU, reg_tokens=4, no_embed_class=True,
                             pos_embed_grid=(16, 16), mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    # vit_base_patch14_reg4_dinov2 with mlp_ratio 5.33334 and SwiGLUPacked (unverified, see weights/h0_mini.json)
    "h0_mini": ViTConfig("h0_mini", 14, 768, 12, 12, 4096, **_SWIGLU, reg_tokens=4, no_embed_class=True,
                         pos_embed_grid=(16, 16), mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD),
    # UNI's architecture
    "mstar": ViTConfig("mstar", 16, 1024, 24, 16, 4096),
    # timm vit_{small,base}_patch{16,8}_224 (no LayerScale), mean/std 0.5
    "kaiko_vits16": ViTConfig("kaiko_vits16", 16, 384, 12, 6, 1536, layer_scale=False, mean=HALF, std=HALF),
    "kaiko_vits8": ViTConfig("kaiko_vits8", 8, 384, 12, 6, 1536, layer_scale=False, pos_embed_grid=(28, 28),
                             mean=HALF, std=HALF),
    "kaiko_vitb16": ViTConfig("kaiko_vitb16", 16, 768, 12, 12, 3072, layer_scale=False, mean=HALF, std=HALF),
    "kaiko_vitb8": ViTConfig("kaiko_vitb8", 8, 768, 12, 12, 3072, layer_scale=False, pos_embed_grid=(28, 28),
                             mean=HALF, std=HALF),
    # timm vit_small_patch8_224 (DINO), Lunit's mean/std
    "lunit_vits8": ViTConfig("lunit_vits8", 8, 384, 12, 6, 1536, layer_scale=False, pos_embed_grid=(28, 28),
                             mean=LUNIT_MEAN, std=LUNIT_STD),
    # transformers ViTModel, ViT-B/16 (LayerNorm eps 1e-12, no LayerScale)
    "phikon": ViTConfig("phikon", 16, 768, 12, 12, 3072, layer_scale=False, norm_eps=1e-12,
                        pos_embed_resample="transformers"),
    # transformers Dinov2Model, ViT-L/16
    "phikon_v2": ViTConfig("phikon_v2", 16, 1024, 24, 16, 4096, pos_embed_resample="transformers"),
    # transformers Dinov2Model, ViT-G/14 (DINOv2 giant: SwiGLU 2 x 4096), 224 px (16 x 16 position grid), mean/std 0.5
    "midnight": ViTConfig("midnight", 14, 1536, 40, 24, 8192, **_SWIGLU, pos_embed_grid=(16, 16),
                          pos_embed_resample="transformers", mean=HALF, std=HALF),
    # Dinov2Model with custom code: ViT-B/14, SwiGLU 2 x 2048, 4 registers (no position embedding), 224 px,
    # the DINOv2 repository's resampling with antialiasing and offset 0
    "hibou_b": ViTConfig("hibou_b", 14, 768, 12, 12, 4096, **_SWIGLU, reg_tokens=4, pos_embed_grid=(16, 16),
                         pos_embed_resample="dinov2", interpolate_antialias=True, mean=HIBOU_MEAN, std=HIBOU_STD),
    # timm vit_large_patch14_dinov2, img_size 224 (a DINOv2 teacher checkpoint, see weights/gpfm.json)
    "gpfm": ViTConfig("gpfm", 14, 1024, 24, 16, 4096, pos_embed_grid=(16, 16)),
    # timm vit_large_patch14_reg4_dinov2 (img_size 518: a 37 x 37 position grid), mean/std 0.5
    "kaiko_vitl14": ViTConfig("kaiko_vitl14", 14, 1024, 24, 16, 4096, reg_tokens=4, no_embed_class=True,
                              pos_embed_grid=(37, 37), mean=HALF, std=HALF),
}
