"""timm hub ``config.json`` (``architecture`` + ``model_args``) -> ``ViTConfig``, refusing every option this port
does not implement by name."""

from __future__ import annotations

from typing import Any, Mapping

from fseg_jax.models.config import IMAGENET_MEAN, IMAGENET_STD, ViTConfig

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


def vit_config_from_timm(timm_config: Mapping[str, Any], name: str | None = None) -> ViTConfig:
    """See ``ViTConfig.from_timm``."""
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
    return ViTConfig(
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
