"""Architecture configs: a frozen dataclass per model family, with named presets for the released checkpoints.

Every number a preset stores is one its checkpoint proves (e.g. ``mlp_hidden=8192``, the fc1 width), not the
float ratio timm derives it from. ``ViTConfig.from_timm`` reads a timm hub ``config.json`` and
``ViTConfig.from_hf`` a Hugging Face transformers one (``ViTModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, and ``Dinov2Model`` re-hosted with the DINOv2 repository's registers and
position-embedding options, as Hibou ships it); both refuse any option this port does not implement.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
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
        """The architecture of a released checkpoint: one of ``ViTConfig.presets()``."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown ViT preset {name!r}; available: {', '.join(sorted(_PRESETS))}") from None

    @staticmethod
    def presets() -> tuple[str, ...]:
        return tuple(sorted(_PRESETS))

    @classmethod
    def from_timm(cls, timm_config: Mapping[str, Any], *, name: str | None = None) -> "ViTConfig":
        """Build a config from a timm hub ``config.json`` (``architecture`` + ``model_args``).

        ``pretrained_cfg`` supplies mean/std when present. Every ``model_args`` key must be one this port
        implements (or one that cannot change the features, such as dropout rates or the classifier head);
        anything else is an error that names the key.
        """
        return _from_timm(cls, timm_config, name)

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
        return _from_hf(cls, hf_config, name)


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

    @classmethod
    def from_preset(cls, name: str = "resnet50") -> "ResNetConfig":
        if name != "resnet50":
            raise ValueError(f"unknown ResNet preset {name!r}; available: resnet50")
        return cls()



def config_from_preset(name: str) -> ViTConfig | ResNetConfig:
    """Any preset name (ViT or ResNet) to its config."""
    if name == "resnet50":
        return ResNetConfig()
    return ViTConfig.from_preset(name)


def preset_names() -> tuple[str, ...]:
    return tuple(sorted((*_PRESETS, "resnet50")))


def _manifest_folder():
    """``weights/`` beside the ``fseg_jax`` package of a source checkout, else the installed ``fseg_jax.weights``.

    The checkout's own folder comes first so that a source tree on ``sys.path`` reads its own manifests even
    where another checkout is installed in editable mode (whose finder maps ``fseg_jax.weights`` to itself).
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "weights" / "__init__.py").is_file():
        return root / "weights"
    return resources.files("fseg_jax.weights")


def read_manifest(name: str) -> dict[str, Any]:
    """The weights manifest of a preset (``weights/<name>.json``, shipped as ``fseg_jax.weights``)."""
    path = _manifest_folder().joinpath(f"{name}.json")
    if not path.is_file():
        raise ValueError(f"no weights manifest for {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def preset_layout(name: str) -> str:
    """The checkpoint layout of a preset's hub file: the manifest's ``layout`` where it names one
    (``"dinov2_teacher"``), else ``"transformers"`` or ``"timm"`` (timm and torchvision)."""
    manifest = read_manifest(name)
    return manifest.get("layout") or ("transformers" if "transformers" in manifest else "timm")


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


# ---------------------------------------------------------------------------------------------------------
# timm config.json -> ViTConfig

# timm architecture name -> its registered defaults (timm/models/vision_transformer.py)
_TIMM_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_small_patch8_224": dict(patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    "vit_giant_patch14_224": dict(patch_size=14, embed_dim=1408, mlp_ratio=48 / 11, depth=40, num_heads=16),
    "vit_giant_patch14_dinov2": dict(
        patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=2.66667 * 2,
        mlp_layer="swiglu_packed", act_layer="silu", img_size=518,
    ),
    "vit_giant_patch14_reg4_dinov2": dict(
        patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5, mlp_ratio=2.66667 * 2,
        mlp_layer="swiglu_packed", act_layer="silu", reg_tokens=4, no_embed_class=True, img_size=518,
    ),
    "vit_large_patch14_dinov2": dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, img_size=518,
    ),
    "vit_base_patch14_reg4_dinov2": dict(
        patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=4,
        no_embed_class=True, img_size=518,
    ),
    "vit_large_patch14_reg4_dinov2": dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4,
        no_embed_class=True, img_size=518,
    ),
}

# model_args that cannot change the features this port computes (inference only, no classifier head)
_INERT_ARGS = {
    "num_classes", "drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
    "drop_path_rate", "weight_init", "dynamic_img_size", "fix_init", "pool_include_prefix", "device", "dtype",
}
# model_args accepted only with the value this port implements (timm's defaults)
_FIXED_ARGS = {
    "in_chans": 3, "qkv_bias": True, "qk_norm": False, "proj_bias": True, "pre_norm": False,
    "final_norm": True, "class_token": None, "dynamic_img_pad": False, "fc_norm": None, "global_pool": None,
    "pos_embed": "learn", "embed_layer": None, "norm_layer": None, "block_fn": None, "scale_attn_norm": False,
    "scale_mlp_norm": False, "attn_layer": None, "embed_norm_layer": None,
}
_FIXED_ALLOWED = {
    "class_token": (True,),
    "fc_norm": (None, False),
    "global_pool": ("token", ""),
    "embed_layer": (None, "PatchEmbed", "timm.layers.PatchEmbed", "timm.layers.patch_embed.PatchEmbed"),
    "norm_layer": (None, "LayerNorm", "layernorm", "torch.nn.LayerNorm"),
    "block_fn": (None, "Block", "timm.models.vision_transformer.Block"),
    "attn_layer": (None, "Attention", "timm.models.vision_transformer.Attention"),
}
_MLP_NAMES = {
    "mlp": "mlp", "Mlp": "mlp", "timm.layers.Mlp": "mlp", "timm.layers.mlp.Mlp": "mlp",
    "swiglu_packed": "swiglu_packed", "SwiGLUPacked": "swiglu_packed", "swiglupacked": "swiglu_packed",
    "timm.layers.SwiGLUPacked": "swiglu_packed", "timm.layers.mlp.SwiGLUPacked": "swiglu_packed",
}
_ACT_NAMES = {
    "gelu": "gelu", "GELU": "gelu", "torch.nn.GELU": "gelu", "nn.GELU": "gelu",
    "silu": "silu", "SiLU": "silu", "swish": "silu", "torch.nn.SiLU": "silu", "nn.SiLU": "silu",
}
_TOP_LEVEL = {"architecture", "model_args", "pretrained_cfg", "num_classes", "num_features", "global_pool",
              "label_names", "label_descriptions"}


def _from_timm(cls, timm_config: Mapping[str, Any], name: str | None) -> ViTConfig:
    problems: list[str] = []
    unknown_top = sorted(set(timm_config) - _TOP_LEVEL)
    if unknown_top:
        problems.append(f"unknown top-level key(s) {unknown_top}")
    arch = timm_config.get("architecture")
    if arch not in _TIMM_ARCHITECTURES:
        raise ValueError(
            f"unsupported timm architecture {arch!r}; supported: {', '.join(sorted(_TIMM_ARCHITECTURES))}"
        )
    args: dict[str, Any] = dict(img_size=224, mlp_ratio=4.0, init_values=None, reg_tokens=0,
                                no_embed_class=False, mlp_layer="mlp", act_layer="gelu")
    args.update(_TIMM_ARCHITECTURES[arch])
    model_args = dict(timm_config.get("model_args") or {})
    if "global_pool" in timm_config:
        model_args.setdefault("global_pool", timm_config["global_pool"])
    for key, value in model_args.items():
        if key in _INERT_ARGS:
            continue
        if key in _FIXED_ARGS:
            allowed = _FIXED_ALLOWED.get(key, (_FIXED_ARGS[key],))
            if value not in allowed:
                problems.append(f"model_args[{key!r}]={value!r} is not implemented (only {allowed})")
            continue
        if key == "mlp_layer":
            if value not in _MLP_NAMES:
                problems.append(f"model_args['mlp_layer']={value!r} is not implemented")
                continue
            value = _MLP_NAMES[value]
        elif key == "act_layer":
            if value not in _ACT_NAMES:
                problems.append(f"model_args['act_layer']={value!r} is not implemented")
                continue
            value = _ACT_NAMES[value]
        elif key not in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values",
                         "reg_tokens", "no_embed_class"):
            problems.append(f"unknown timm argument model_args[{key!r}]={value!r}")
            continue
        args[key] = value
    if problems:
        raise ValueError(f"cannot build a ViTConfig from the timm config of {arch!r}: " + "; ".join(problems))

    img = args["img_size"]
    img_hw = (img, img) if isinstance(img, int) else tuple(img)
    patch = args["patch_size"]
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    pretrained = timm_config.get("pretrained_cfg") or {}
    if "mean" in pretrained:
        mean = tuple(pretrained["mean"])
    if "std" in pretrained:
        std = tuple(pretrained["std"])
    return cls(
        name=name or arch,
        patch_size=patch,
        embed_dim=args["embed_dim"],
        depth=args["depth"],
        num_heads=args["num_heads"],
        # timm: hidden_features = int(dim * mlp_ratio)
        mlp_hidden=int(args["embed_dim"] * args["mlp_ratio"]),
        mlp_layer=args["mlp_layer"],
        act_layer=args["act_layer"],
        reg_tokens=args["reg_tokens"],
        no_embed_class=args["no_embed_class"],
        pos_embed_grid=(img_hw[0] // patch, img_hw[1] // patch),
        layer_scale=args["init_values"] is not None,
        mean=mean,
        std=std,
    )


# ---------------------------------------------------------------------------------------------------------
# Hugging Face transformers config.json -> ViTConfig

# model_type -> (the architectures entry it must have, its keys with transformers' defaults)
_HF_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("ViTModel", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                             hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16)),
    "dinov2": ("Dinov2Model", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                                   use_swiglu_ffn=False)),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
        layer_norm_eps=1e-6, image_size=224, patch_size=16, use_swiglu_ffn=False, num_register_tokens=4)),
}
# keys that cannot change the features of the base model at inference (bookkeeping, dropout, initialisation,
# the options of the backbone / pooler / masked-image heads that this port does not build)
_HF_INERT = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "id2label",
    "label2id", "hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate", "initializer_range",
    "layerscale_value", "encoder_stride", "pooler_output_size", "pooler_act", "use_mask_token", "out_features",
    "out_indices", "stage_names", "apply_layernorm", "reshape_hidden_states",
    # generic PreTrainedConfig options (runtime outputs, text-model settings), present in full dumps
    "return_dict", "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "tie_word_embeddings",
}
# keys accepted only with the value this port implements
_HF_FIXED = {"num_channels": 3, "qkv_bias": True, "pruned_heads": {}}
# A Dinov2Model re-hosted with its own modeling code (``auto_map``, loaded with ``trust_remote_code``), as Hibou ships
# it: the DINOv2 repository's ViT, with register tokens inserted after the position embeddings are added and that
# repository's position-embedding resampling. Read only with such an ``auto_map``, and all required: the custom
# code's own defaults are not known here.
_HF_DINOV2_REMOTE_KEYS = ("num_register_tokens", "interpolate_antialias", "interpolate_offset")


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else tuple(int(v) for v in value)


def _from_hf(cls, hf_config: Mapping[str, Any], name: str | None) -> ViTConfig:
    model_type = hf_config.get("model_type")
    if model_type not in _HF_MODELS:
        raise ValueError(
            f"unsupported transformers model_type {model_type!r}; supported: {', '.join(sorted(_HF_MODELS))}"
        )
    architecture, defaults = _HF_MODELS[model_type]
    problems: list[str] = []
    remote = model_type == "dinov2" and "auto_map" in hf_config
    if remote:
        auto_map = hf_config["auto_map"]
        auto_model = auto_map.get("AutoModel") if isinstance(auto_map, dict) else None
        if not (isinstance(auto_model, str) and auto_model.endswith(".Dinov2Model")):
            problems.append(f"auto_map={hf_config['auto_map']!r} is not implemented (only a custom '*.Dinov2Model')")
        missing = [k for k in _HF_DINOV2_REMOTE_KEYS if k not in hf_config]
        if missing:
            problems.append(f"a custom-code Dinov2Model config needs {missing} (their defaults are the custom code's)")
        defaults = {**defaults, **{k: None for k in _HF_DINOV2_REMOTE_KEYS}, "auto_map": None}
    for key in sorted(set(hf_config) - set(defaults) - _HF_INERT - set(_HF_FIXED)):
        problems.append(f"unknown transformers option {key!r}={hf_config[key]!r}")
    for key, allowed in _HF_FIXED.items():
        if key in hf_config and hf_config[key] != allowed:
            problems.append(f"{key}={hf_config[key]!r} is not implemented (only {allowed!r})")
    architectures = hf_config.get("architectures") or [architecture]
    if list(architectures) != [architecture]:
        problems.append(f"architectures={list(architectures)!r} is not implemented (only [{architecture!r}])")
    args = {**defaults, **{k: v for k, v in hf_config.items() if k in defaults}}
    swiglu = bool(args.get("use_swiglu_ffn", False))
    if not swiglu and args["hidden_act"] != "gelu":  # the SwiGLU FFN of Dinov2Model uses SiLU whatever hidden_act says
        problems.append(f"hidden_act={args['hidden_act']!r} is not implemented (only 'gelu')")
    patch, img = _pair(args["patch_size"]), _pair(args["image_size"])
    if patch[0] != patch[1]:
        problems.append(f"patch_size={args['patch_size']!r} is not implemented (square patches only)")
    grid = (img[0] // patch[0], img[1] // patch[1])
    if grid[0] != grid[1]:  # transformers reshapes the stored grid to sqrt(num_positions) on each side
        problems.append(f"image_size={args['image_size']!r} is not implemented (a square position grid only)")
    if problems:
        raise ValueError(
            f"cannot build a ViTConfig from the transformers {model_type!r} config: " + "; ".join(problems)
        )

    if remote:
        resample = dict(pos_embed_resample="dinov2", interpolate_antialias=bool(args["interpolate_antialias"]),
                        interpolate_offset=float(args["interpolate_offset"]))
    else:
        resample = dict(pos_embed_resample="timm" if model_type == "dinov2_with_registers" else "transformers")
    d = int(args["hidden_size"])
    if model_type == "vit":
        mlp = dict(mlp_hidden=int(args["intermediate_size"]))
    elif swiglu:  # Dinov2SwiGLUFFN: weights_in is Linear(D, 2 * hidden), hidden rounded up to a multiple of 8
        hidden = int(d * args["mlp_ratio"])
        mlp = dict(mlp_hidden=2 * ((int(hidden * 2 / 3) + 7) // 8 * 8), mlp_layer="swiglu_packed", act_layer="silu")
    else:
        mlp = dict(mlp_hidden=int(d * args["mlp_ratio"]))
    return cls(
        name=name or model_type,
        patch_size=patch[0],
        embed_dim=d,
        depth=int(args["num_hidden_layers"]),
        num_heads=int(args["num_attention_heads"]),
        **mlp,
        pos_embed_grid=grid,
        reg_tokens=int(args.get("num_register_tokens") or 0),
        layer_scale=model_type != "vit",
        norm_eps=float(args["layer_norm_eps"]),
        **resample,
    )
