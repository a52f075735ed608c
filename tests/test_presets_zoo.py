"""The presets of more pathology encoders: timm format (kaiko.ai ViT-S/B at patch 16 and 8 and ViT-L/14 with
registers, Lunit DINO ViT-S/8, mSTAR) from a folder as timm's hub ships it; GPFM's DINOv2 training checkpoint from a
fake hub cache; transformers format (Midnight's Dinov2Model, Hibou-B's custom-code Dinov2Model with registers and the
DINOv2 repository's position-embedding resampling); and patch-8 and patch-14 models through ``fseg_jax.segment``."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hf_models import hf_hidden_states, make_hf_model, make_hf_preset, save_hf_folder
from test_convert_hf import assert_hidden_state_parity
from test_hub import fake_hub_cache, use_hf_home
from test_wsi import standin_token_fn
from timm_models import make_timm_model, random_input, relative_error, save_hub_files, timm_intermediates

import fseg_jax
import fseg_jax.hub as hub
from fseg_jax import ViTConfig, convert_hf_state_dict, load_model
from fseg_jax.convert.engine import ConversionError
from fseg_jax.convert.timm import convert_dinov2_teacher_state_dict
from fseg_jax.hub import random_model
from fseg_jax.models.weights import read_manifest
from fseg_jax.models.vit import torch_bicubic_matrix
from fseg_jax.wsi.pipeline import SlideSegmenter

# preset -> an input size (multiples of the patch) whose grid differs from the stored one
TIMM_PRESETS = {"kaiko_vits16": (224, 160), "kaiko_vits8": (200, 136), "kaiko_vitb16": (160, 224),
                "kaiko_vitb8": (136, 200), "lunit_vits8": (200, 136), "mstar": (224, 160), "kaiko_vitl14": (224, 168)}
NEW_PRESETS = ("midnight", "hibou_b", "gpfm", "kaiko_vitl14")


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
    assert all(read_manifest(p)["verified"] is False for p in (*TIMM_PRESETS, *NEW_PRESETS))
    vitl14 = ViTConfig.from_preset("kaiko_vitl14")
    assert (vitl14.patch_size, vitl14.reg_tokens, vitl14.no_embed_class) == (14, 4, True)
    assert vitl14.pos_embed_grid == (37, 37)
    assert all(read_manifest(p)["hf_repo"] and read_manifest(p)["filename"] and read_manifest(p)["license"]
               for p in NEW_PRESETS)


def test_patch8_model_segments_a_tile():
    """A 224 px tile gives a 28 x 28 token grid at patch 8."""
    model = random_model("kaiko_vits8", depth=1)
    concepts = np.abs(np.random.default_rng(0).standard_normal((4, 384))).astype(np.float32)
    tile = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    result = fseg_jax.segment(tile, concepts, model=model, return_weights=True)
    assert result.labels.shape == (224, 224) and result.weights.shape == (28, 28, 4)
    assert 0 <= result.labels.min() and result.labels.max() < 4


def test_patch14_model_segments_images_that_are_not_multiples_of_14():
    """224 px is 16 x 16 tokens at patch 14; 230 x 200 px is padded by edge replication to 238 x 210 (17 x 15
    tokens) and the labels come back at the image's own size."""
    model = random_model("hibou_b", depth=1)
    concepts = np.abs(np.random.default_rng(0).standard_normal((4, 768))).astype(np.float32)
    rng = np.random.default_rng(1)
    tile = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    result = fseg_jax.segment(tile, concepts, model=model, return_weights=True)
    assert result.labels.shape == (224, 224) and result.weights.shape == (16, 16, 4)
    odd = rng.integers(0, 256, (230, 200, 3), dtype=np.uint8)
    result = fseg_jax.segment(odd, concepts, model=model, return_weights=True)
    assert result.labels.shape == (230, 200) and result.weights.shape == (17, 15, 4)
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        model.forward_intermediates(np.zeros((1, 230, 224, 3), np.float32))


# --- GPFM: a DINOv2 training checkpoint ---------------------------------------------------------------------------

def dinov2_teacher_checkpoint(timm_model, block_chunks: int) -> dict:
    """A timm DINOv2 ViT's weights laid out as the DINOv2 repository's training checkpoint stores its teacher:
    ``backbone.`` prefix, blocks chunked (``blocks.<chunk>.<block>.``), the DINO head and the mask token."""
    depth = len(timm_model.blocks)
    per_chunk = depth // block_chunks
    teacher = {}
    for key, value in timm_model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            parts.insert(1, str(int(parts[1]) // per_chunk))
        teacher["backbone." + ".".join(parts)] = value.detach().clone()
    gen = torch.Generator().manual_seed(3)
    teacher["backbone.mask_token"] = torch.randn(1, timm_model.embed_dim, generator=gen)
    teacher["dino_head.mlp.0.weight"] = torch.randn(64, timm_model.embed_dim, generator=gen)
    teacher["dino_head.last_layer.weight_v"] = torch.randn(128, 64, generator=gen)
    return {"teacher": teacher}


def test_gpfm_parity_from_its_training_checkpoint_in_a_hub_cache(tmp_path, monkeypatch):
    """GPFM's release: {"teacher": ...} with ``backbone.``, chunked blocks, ``dino_head.*`` and ``mask_token``,
    saved as torch.save writes it, loaded as the preset from an offline hub cache; two blocks at full width."""
    timm_model = make_timm_model("gpfm", depth=2)
    checkpoint = dinov2_teacher_checkpoint(timm_model, block_chunks=2)
    assert "backbone.blocks.1.1.attn.qkv.weight" in checkpoint["teacher"]
    torch.save(checkpoint, tmp_path / "GPFM.pth")
    use_hf_home(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(hub, "config_from_preset",
                        lambda name: dataclasses.replace(ViTConfig.from_preset(name), depth=2))
    fake_hub_cache(tmp_path / "hf" / "hub", "gpfm", tmp_path / "GPFM.pth")
    ours = load_model("gpfm")
    assert ours.config.name == "gpfm" and ours.config.pos_embed_grid == (16, 16)
    x = random_input(182, 238)
    grids, final = timm_intermediates(timm_model, x)
    blocks = ours.forward_intermediates(x)
    errors = [relative_error(g, r) for g, r in zip(blocks, grids)]
    errors.append(relative_error(ours.norm(blocks[-1]), final))
    assert max(errors) <= 1e-5, errors


def test_dinov2_teacher_accounting():
    """Unchunked blocks convert too; an unknown teacher key, a missing one and an entry beside the teacher are
    reported by name; the DINO head and mask token are the only keys dropped."""
    timm_model = make_timm_model("gpfm", depth=1, perturb=False)
    config = dataclasses.replace(ViTConfig.from_preset("gpfm"), depth=1)
    checkpoint = dinov2_teacher_checkpoint(timm_model, block_chunks=1)
    plain = {"teacher": {k.replace("blocks.0.0.", "blocks.0."): v for k, v in checkpoint["teacher"].items()}}
    convert_dinov2_teacher_state_dict(plain, config)
    broken = dict(checkpoint["teacher"])
    broken["ibot_head.mlp.0.weight"] = torch.zeros(4, 4)
    del broken["backbone.blocks.0.0.ls2.gamma"]
    with pytest.raises(ConversionError) as err:
        convert_dinov2_teacher_state_dict({"teacher": broken}, config)
    assert len(err.value.problems) == 2
    assert "unexpected key 'ibot_head.mlp.0.weight'" in str(err.value)
    assert "missing key for parameter 'blocks.0.ls2.gamma'" in str(err.value)
    with pytest.raises(ConversionError, match=r"unexpected entries \['student'\]"):
        convert_dinov2_teacher_state_dict({**checkpoint, "student": checkpoint["teacher"]}, config)
    with pytest.raises(ConversionError, match="no teacher state dict"):
        convert_dinov2_teacher_state_dict(checkpoint["teacher"], config)


# --- transformers: Midnight and Hibou-B ---------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["midnight", "hibou_b"])
def test_preset_matches_its_manifest_transformers_config(preset):
    """The preset is what from_hf reads from the manifest's config.json, with the image processor's mean/std
    (which transformers keeps outside config.json); the config survives its dict form (the converted folder's)."""
    manifest = read_manifest(preset)
    derived = ViTConfig.from_hf(manifest["transformers"], name=preset)
    processor = manifest["preprocessor"]
    config = ViTConfig.from_preset(preset)
    mean, std = tuple(processor["image_mean"]), tuple(processor["image_std"])
    assert dataclasses.replace(derived, mean=mean, std=std) == config
    assert ViTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_midnight_parity_from_a_hub_folder(tmp_path):
    """Dinov2Model of Midnight's manifest config (ViT-G/14, SwiGLU), two blocks at full width, 224 px stored grid
    (16 x 16) resampled to 13 x 17."""
    model = make_hf_preset("midnight", depth=2)
    ours = load_model(save_hf_folder(model, tmp_path / "midnight"))
    preset = ViTConfig.from_preset("midnight")
    assert ours.config == dataclasses.replace(preset, name="midnight", depth=2, mean=ours.config.mean,
                                              std=ours.config.std)
    assert ours.config.mlp_hidden == 8192 and preset.mean == (0.5, 0.5, 0.5)
    assert_hidden_state_parity(model, ours, random_input(182, 238))


def hibou_interpolate_pos_encoding(embeddings_module, antialias: bool, offset: float):
    """``DinoVisionTransformer.interpolate_pos_encoding`` of HistAI/hibou (hibou/models/vision_transformer.py, the
    DINOv2 repository's code, public source), rewritten for the transformers embeddings module it replaces, standing in for Hibou's
    hub modeling code (modeling_dinov2.py, loaded with trust_remote_code), which is not part of any installable
    package. Its ``w``/``h`` are the input's height and width, in that order."""

    def interpolate(x, w, h):
        pos_embed = embeddings_module.position_embeddings
        npatch, n = x.shape[1] - 1, pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return pos_embed
        pos_embed = pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim = x.shape[-1]
        p = embeddings_module.config.patch_size
        w0, h0 = w // p, h // p
        m = int(math.sqrt(n))
        kwargs = {}
        if offset:
            kwargs["scale_factor"] = (float(w0 + offset) / m, float(h0 + offset) / m)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = torch.nn.functional.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs)
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(x.dtype)

    return interpolate


def make_hibou(hf_config: dict, depth: int):
    """Hibou's architecture as a reference: transformers' Dinov2WithRegistersModel (registers inserted after the
    position embeddings, the packed SwiGLU FFN, LayerScale; its checkpoint keys are those Hibou's custom Dinov2Model
    is taken to ship) with Hibou's own position-embedding interpolation."""
    custom = ("auto_map", "interpolate_antialias", "interpolate_offset")
    config = {**{k: v for k, v in hf_config.items() if k not in custom}, "model_type": "dinov2_with_registers",
              "architectures": ["Dinov2WithRegistersModel"]}
    model = make_hf_model(config, depth)
    model.embeddings.interpolate_pos_encoding = hibou_interpolate_pos_encoding(
        model.embeddings, hf_config["interpolate_antialias"], hf_config["interpolate_offset"])
    return model


def save_hibou_folder(model, hf_config: dict, depth: int, directory):
    """The weights as save_pretrained writes them, with Hibou's config.json (custom-code keys) beside them."""
    folder = save_hf_folder(model, directory)
    (folder / "config.json").write_text(json.dumps({**hf_config, "num_hidden_layers": depth}))
    return folder


@pytest.mark.parametrize("antialias, offset", [(True, 0.0), (False, 0.1)])
def test_hibou_parity_from_a_hub_folder(antialias, offset, tmp_path):
    """Hibou-B's config (antialiasing, offset 0) and the DINOv2 repository's defaults (no antialiasing, offset
    0.1: torch is given a scale factor, not a size) through ``pos_embed_resample="dinov2"``; two blocks at full
    width, stored grid 16 x 16, input grid 13 x 17."""
    hf_config = {**read_manifest("hibou_b")["transformers"], "interpolate_antialias": antialias,
                 "interpolate_offset": offset}
    model = make_hibou(hf_config, depth=2)
    ours = load_model(save_hibou_folder(model, hf_config, 2, tmp_path / "hibou"))
    assert (ours.config.pos_embed_resample, ours.config.interpolate_antialias,
            ours.config.interpolate_offset) == ("dinov2", antialias, offset)
    if antialias:
        preset = ViTConfig.from_preset("hibou_b")
        assert ours.config == dataclasses.replace(preset, name="hibou", depth=2, mean=ours.config.mean,
                                                  std=ours.config.std)
    x = random_input(182, 238)
    assert_hidden_state_parity(model, ours, x)
    if offset:  # the option matters: the same weights resampled to the target size instead are measurably off
        states, _ = hf_hidden_states(model, x)
        sized = convert_hf_state_dict(dict(model.state_dict()),
                                          dataclasses.replace(ours.config, interpolate_offset=0.0))
        assert relative_error(sized.forward_intermediates(x, indices=[0])[0], states[1]) > 1e-3


@pytest.mark.parametrize("n_in, n_out, offset", [(16, 13, 0.0), (16, 17, 0.0), (37, 16, 0.0), (16, 13, 0.1),
                                                 (16, 16, 0.1), (16, 40, 0.1), (28, 9, 0.1)])
@pytest.mark.parametrize("antialias", [False, True])
def test_torch_bicubic_matrix_with_antialias_and_offset(n_in, n_out, offset, antialias):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 5, n_in, 7)).astype(np.float32))
    kwargs = {"scale_factor": ((n_out + offset) / n_in, 1.0)} if offset else {"size": (n_out, 7)}
    ref = torch.nn.functional.interpolate(x, mode="bicubic", align_corners=False, antialias=antialias, **kwargs)
    matrix = torch_bicubic_matrix(n_in, n_out, antialias=antialias, offset=offset)
    ours = np.einsum("ih,chw->ciw", matrix, x[0].numpy())
    assert np.abs(ours - ref[0].numpy()).max() <= 1e-5 * np.abs(ref.numpy()).max()


def test_custom_dinov2_configs_are_read_only_with_their_keys():
    """Hibou's keys are refused by name without an auto_map naming a Dinov2Model; with one, all three are needed;
    the resampling options are refused on the other resampling modes."""
    hibou = read_manifest("hibou_b")["transformers"]
    without = {k: v for k, v in hibou.items() if k != "auto_map"}
    with pytest.raises(ValueError) as err:
        ViTConfig.from_hf(without)
    for key in ("interpolate_antialias", "interpolate_offset", "num_register_tokens"):
        assert f"unknown transformers option {key!r}" in str(err.value)
    with pytest.raises(ValueError, match="only a custom"):
        ViTConfig.from_hf({**hibou, "auto_map": {"AutoModel": "modeling_other.OtherModel"}})
    with pytest.raises(ValueError, match="needs \\['interpolate_offset'\\]"):
        ViTConfig.from_hf({k: v for k, v in hibou.items() if k != "interpolate_offset"})
    with pytest.raises(ValueError, match="apply to pos_embed_resample='dinov2' only"):
        dataclasses.replace(ViTConfig.from_preset("phikon"), interpolate_antialias=True)


@pytest.mark.parametrize("patch, tile, margin", [(16, 1024, 64), (14, 1022, 56), (8, 1024, 64)])
def test_slide_tiles_default_to_a_multiple_of_the_patch(patch, tile, margin):
    """The slide pipeline's default tile is 1024 px rounded down to whole patches, so patch-14 models run
    without a --tile; a tile that is not a multiple of the patch is refused by name."""
    fn, params = standin_token_fn(patch=patch)
    segmenter = SlideSegmenter(fn, params, patch_size=patch, k=4)
    assert (segmenter.tile, segmenter.margin) == (tile, margin)
    with pytest.raises(ValueError, match="multiples of the patch size 14"):
        SlideSegmenter(fn, params, patch_size=14, k=4, tile=1024)
