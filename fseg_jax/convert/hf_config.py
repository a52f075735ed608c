"""Hugging Face transformers ``config.json`` (``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, and
``Dinov2Model`` re-hosted with custom code as Hibou ships it) -> ``ViTConfig``, refusing every option this port does not
implement by name."""

from __future__ import annotations

from typing import Any, Mapping

from fseg_jax.models.config import ViTConfig

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


def vit_config_from_hf(hf_config: Mapping[str, Any], name: str | None = None) -> ViTConfig:
    """See ``ViTConfig.from_hf``."""
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
    return ViTConfig(
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
