"""The timm-format presets of more pathology encoders (kaiko.ai ViT-S/B at patch 16 and 8, Lunit DINO ViT-S/8,
mSTAR): parity from a folder as timm's hub ships it, and patch-8 models through ``fseg_jax.segment``."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from timm_models import make_timm_model, random_input, relative_error, save_hub_files, timm_intermediates

import fseg_jax
from fseg_jax import ViTConfig, load_model
from fseg_jax.hub import random_model
from fseg_jax.models.config import read_manifest

# preset -> an input size (multiples of the patch) whose grid differs from the stored one
TIMM_PRESETS = {"kaiko_vits16": (224, 160), "kaiko_vits8": (200, 136), "kaiko_vitb16": (160, 224),
                "kaiko_vitb8": (136, 200), "lunit_vits8": (200, 136), "mstar": (224, 160)}


def save_timm_hub_folder(preset, model, directory, depth):
    """``model.safetensors`` + timm's hub ``config.json`` (architecture, model_args, pretrained_cfg mean/std)."""
    spec = read_manifest(preset)["timm"]
    save_hub_files(model, directory)
    (directory / "pytorch_model.bin").unlink()
    config = ViTConfig.from_preset(preset)
    hub_config = {"architecture": spec["architecture"], "num_classes": 0, "global_pool": "token",
                  "model_args": {**spec["model_args"], "depth": depth},
                  "pretrained_cfg": {"mean": list(config.mean), "std": list(config.std)}}
    (directory / "config.json").write_text(json.dumps(hub_config))
    return directory


@pytest.mark.parametrize("preset", sorted(TIMM_PRESETS))
def test_timm_preset_parity_from_a_hub_folder(preset, tmp_path):
    """Two blocks at full width, every parameter perturbed (LayerScale in [0.1, 1] where present)."""
    timm_model = make_timm_model(preset, depth=2)
    ours = load_model(save_timm_hub_folder(preset, timm_model, tmp_path / preset, depth=2))
    assert ours.config == dataclasses.replace(ViTConfig.from_preset(preset), name=preset, depth=2)
    x = random_input(*TIMM_PRESETS[preset])
    grids, final = timm_intermediates(timm_model, x)
    blocks = ours.forward_intermediates(x)
    errors = [relative_error(g, r) for g, r in zip(blocks, grids)]
    errors.append(relative_error(ours.norm(blocks[-1]), final))  # LayerNorm is per token: norm=True's output
    assert max(errors) <= 1e-5, errors


def test_preset_facts():
    vits8 = ViTConfig.from_preset("kaiko_vits8")
    assert (vits8.patch_size, vits8.embed_dim, vits8.pos_embed_grid, vits8.mean) == (8, 384, (28, 28), (0.5,) * 3)
    assert not vits8.layer_scale and ViTConfig.from_preset("mstar").layer_scale
    assert ViTConfig.from_preset("lunit_vits8").mean == pytest.approx((0.7032, 0.5361, 0.6610), abs=1e-4)
    assert all(read_manifest(p)["verified"] is False for p in TIMM_PRESETS)


def test_patch8_model_segments_a_tile():
    """A 224 px tile gives a 28 x 28 token grid at patch 8."""
    model = random_model("kaiko_vits8", depth=1)
    concepts = np.abs(np.random.default_rng(0).standard_normal((4, 384))).astype(np.float32)
    tile = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    result = fseg_jax.segment(tile, concepts, model=model, return_weights=True)
    assert result.labels.shape == (224, 224) and result.weights.shape == (28, 28, 4)
    assert 0 <= result.labels.min() and result.labels.max() < 4
