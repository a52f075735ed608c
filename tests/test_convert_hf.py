"""transformers ViTModel / Dinov2Model checkpoints: parity through load_model, strict accounting, config
parsing, position-embedding resampling as transformers does it, and the presets built on them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from hf_models import hf_hidden_states, make_hf_model, make_hf_preset, save_hf_folder
from timm_models import random_input, relative_error

import fseg_jax.hub as hub
from fseg_jax import ViTConfig, convert_hf_state_dict, load_model
from fseg_jax.convert.checkpoint import open_checkpoint
from fseg_jax.convert.engine import ConversionError
from fseg_jax.models.weights import read_manifest
from fseg_jax.models.vit import torch_bicubic_matrix

HF_PRESETS = ["phikon", "phikon_v2"]
TOL = 1e-5


def assert_hidden_state_parity(model, ours, x, tol=TOL):
    """Every layer's patch tokens (hidden_states[i + 1] = block i) and last_hidden_state (= norm=True)."""
    states, last = hf_hidden_states(model, x)
    assert len(states) == ours.config.depth + 1  # the embeddings, then one state per layer
    grids = ours.forward_intermediates(x)
    errors = [relative_error(g, s) for g, s in zip(grids, states[1:])]
    errors.append(relative_error(ours.norm(grids[-1]), last))  # LayerNorm is per token: norm=True's output
    assert max(errors) <= tol, errors
    return max(errors)


def test_hidden_states_map_to_forward_intermediates_indices():
    """hidden_states[i + 1] is block i (hidden_states[0] the embeddings); last_hidden_state is norm=True."""
    model = make_hf_model({"model_type": "dinov2", "hidden_size": 64, "num_attention_heads": 4, "patch_size": 16},
                          depth=3)
    ours = convert_hf_state_dict(dict(model.state_dict()), ViTConfig.from_hf(model.config.to_dict()))
    x = random_input(64, 96)
    states, last = hf_hidden_states(model, x)
    assert len(states) == 4
    first, final = ours.forward_intermediates(x, indices=[0, -1])
    assert relative_error(first, states[1]) <= TOL and relative_error(final, states[3]) <= TOL
    (middle,) = ours.forward_intermediates(x, indices=[1])
    assert relative_error(middle, states[2]) <= TOL
    (normed,) = ours.forward_intermediates(x, indices=1, norm=True)
    assert relative_error(normed, last) <= TOL


@pytest.mark.parametrize("preset, size", [("phikon", (224, 160)), ("phikon_v2", (160, 224))])
def test_preset_parity_from_a_hub_folder(preset, size, tmp_path):
    """The real architecture (two blocks, full width) saved by save_pretrained, loaded from the folder; the
    input's grid differs from the stored 14 x 14 one, so the position embeddings are resampled."""
    model = make_hf_preset(preset, depth=2)
    folder = save_hf_folder(model, tmp_path / preset)
    ours = load_model(folder)
    expected = dataclasses.replace(ViTConfig.from_preset(preset), name=preset, depth=2)
    assert ours.config == expected
    assert_hidden_state_parity(model, ours, random_input(*size))


def test_dinov2_swiglu_patch8_and_torch_state_dict(tmp_path):
    """Dinov2Model with the packed SwiGLU FFN (weights_in = gate, up) at patch 8, grid 25 x 17 from 28 x 28;
    the in-memory state dict of transformers 5 (q_proj, gate_proj / up_proj, torch tensors) converts like the
    hub layout of the saved file."""
    hf_config = {"model_type": "dinov2", "hidden_size": 384, "num_attention_heads": 6, "mlp_ratio": 4,
                 "patch_size": 8, "image_size": 224, "use_swiglu_ffn": True}
    model = make_hf_model(hf_config, depth=2)
    ours = load_model(save_hf_folder(model, tmp_path / "d2"))
    assert ours.config.mlp_layer == "swiglu_packed" and ours.config.mlp_hidden == 2 * 1024
    x = random_input(200, 136)
    assert_hidden_state_parity(model, ours, x)
    in_memory = dict(model.state_dict())
    assert {"encoder.layer.0.mlp.gate_proj.weight", "encoder.layer.0.attention.q_proj.weight"} <= set(in_memory)
    direct = convert_hf_state_dict(in_memory, ours.config)
    np.testing.assert_array_equal(np.asarray(direct.forward_intermediates(x)[-1]),
                                  np.asarray(ours.forward_intermediates(x)[-1]))


def test_dinov2_with_registers(tmp_path):
    """Dinov2WithRegistersModel (4 registers without position embeddings, antialiased bicubic resampling), with
    a SwiGLU FFN at patch 14 and image size 518 (stored grid 37 x 37, input grid 16 x 12): from the saved
    folder and from the in-memory state dict."""
    hf_config = {"model_type": "dinov2_with_registers", "hidden_size": 384, "num_attention_heads": 6,
                 "patch_size": 14, "image_size": 518, "use_swiglu_ffn": True, "num_register_tokens": 4}
    model = make_hf_model(hf_config, depth=2)
    ours = load_model(save_hf_folder(model, tmp_path / "reg"))
    assert (ours.config.reg_tokens, ours.config.pos_embed_grid, ours.config.pos_embed_resample) == (4, (37, 37), "timm")
    x = random_input(224, 168)
    assert_hidden_state_parity(model, ours, x)
    direct = convert_hf_state_dict(dict(model.state_dict()), ours.config)
    np.testing.assert_array_equal(np.asarray(direct.forward_intermediates(x)[-1]),
                                  np.asarray(ours.forward_intermediates(x)[-1]))


def test_timm_resampling_would_not_match():
    """The option matters: timm's antialiased bicubic is measurably off transformers' interpolation."""
    model = make_hf_preset("phikon", depth=1)
    config = ViTConfig.from_hf(model.config.to_dict())
    state = dict(model.state_dict())
    x = random_input(224, 96)
    states, _ = hf_hidden_states(model, x)
    good = convert_hf_state_dict(state, config).forward_intermediates(x)[0]
    timm_like = convert_hf_state_dict(state, dataclasses.replace(config, pos_embed_resample="timm"))
    assert relative_error(good, states[1]) <= TOL
    assert relative_error(timm_like.forward_intermediates(x)[0], states[1]) > 100 * TOL


@pytest.mark.parametrize("n_in, n_out", [(14, 14), (14, 10), (14, 25), (28, 13), (28, 30), (4, 1)])
def test_torch_bicubic_matrix_matches_torch_interpolate(n_in, n_out):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 5, n_in, 7)).astype(np.float32))
    ref = torch.nn.functional.interpolate(x, size=(n_out, 7), mode="bicubic", align_corners=False)[0].numpy()
    ours = np.einsum("ih,chw->ciw", torch_bicubic_matrix(n_in, n_out), x[0].numpy())
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_load_preset_from_offline_hub_cache(tmp_path, monkeypatch):
    from test_hub import fake_hub_cache, use_hf_home

    model = make_hf_preset("phikon", depth=1)
    folder = save_hf_folder(model, tmp_path / "files")
    use_hf_home(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(hub, "config_from_preset",
                        lambda name: dataclasses.replace(ViTConfig.from_preset(name), depth=1))
    fake_hub_cache(tmp_path / "hf" / "hub", "phikon", folder / "model.safetensors")
    ours = load_model("phikon")
    assert ours.config.name == "phikon" and ours.config.norm_eps == 1e-12
    assert_hidden_state_parity(model, ours, random_input(160, 224))
    assert hub.model_source(ours) == "phikon"


@pytest.mark.parametrize("preset", HF_PRESETS)
def test_preset_matches_its_manifest_transformers_config(preset):
    manifest = read_manifest(preset)
    assert ViTConfig.from_hf(manifest["transformers"], name=preset) == ViTConfig.from_preset(preset)
    assert manifest["hf_repo"] and manifest["filename"] and manifest["license"] and manifest["revision"]


def test_from_hf_refuses_what_it_does_not_implement():
    config = {"model_type": "dinov2", "architectures": ["Dinov2ForImageClassification"], "qkv_bias": False,
              "frobnicate": 3, "hidden_act": "relu"}
    with pytest.raises(ValueError) as err:
        ViTConfig.from_hf(config)
    message = str(err.value)
    for name in ("Dinov2ForImageClassification", "qkv_bias", "frobnicate", "hidden_act='relu'"):
        assert name in message
    with pytest.raises(ValueError, match="unsupported transformers model_type 'vit_mae'"):
        ViTConfig.from_hf({"model_type": "vit_mae"})
    with pytest.raises(ValueError, match="image_size"):
        ViTConfig.from_hf({"model_type": "vit", "image_size": [224, 160]})
    # inert keys of a hub config (dropout, backbone options) are accepted
    parsed = ViTConfig.from_hf({"model_type": "dinov2", "drop_path_rate": 0.1, "out_features": ["stage12"],
                                "layerscale_value": 1e-5, "torch_dtype": "float32", "patch_size": 16})
    assert parsed.layer_scale and parsed.pos_embed_grid == (14, 14) and parsed.pos_embed_resample == "transformers"


def test_every_problem_is_reported_in_one_error(tmp_path):
    model = make_hf_model({"model_type": "dinov2", "hidden_size": 64, "num_attention_heads": 4, "patch_size": 16},
                          depth=1)
    config = ViTConfig.from_hf(model.config.to_dict())
    state = dict(open_checkpoint(save_hf_folder(model, tmp_path / "d2") / "model.safetensors"))  # the hub layout
    convert_hf_state_dict({**state, "pooler.dense.weight": np.zeros((64, 64))}, config)  # ignored by name
    broken = dict(state)
    del broken["encoder.layer.0.attention.attention.key.weight"]  # one part of the fused qkv missing
    del broken["encoder.layer.0.layer_scale2.lambda1"]  # missing
    broken["encoder.layer.0.attention.attention.value.bias"] = np.zeros(32)  # wrong shape of a part
    broken["encoder.layer.0.attention.attention.q_norm.weight"] = np.ones(16)  # unknown
    broken["encoder.layer.1.norm1.weight"] = np.ones(64)  # a layer the config does not have
    with pytest.raises(ConversionError) as err:
        convert_hf_state_dict(broken, config)
    message = str(err.value)
    assert len(err.value.problems) == 5, message
    assert "missing key for part 2 of 3 of parameter 'blocks.0.attn.qkv.kernel'" in message
    assert "missing key for parameter 'blocks.0.ls2.gamma'" in message
    assert "'blocks.0.attn.qkv.bias' (part 3 of 3) (64,) expected" in message
    assert "unexpected key 'encoder.layer.0.attention.attention.q_norm.weight'" in message
    assert "unexpected key 'encoder.layer.1.norm1.weight'" in message


def test_folder_config_picks_the_converter(tmp_path):
    """A transformers config.json with a timm-like name still goes through the transformers rules; a config
    that is neither is reported as such."""
    model = make_hf_model({"model_type": "vit", "hidden_size": 64, "num_attention_heads": 4,
                           "intermediate_size": 128}, depth=1)
    folder = save_hf_folder(model, tmp_path / "vit")
    meta = json.loads((folder / "config.json").read_text())
    meta["encoder_stride"] = 16
    meta["use_mask_token_in_vit"] = True
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="unknown transformers option 'use_mask_token_in_vit'"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ConversionError, match="not an fseg_jax config"):
        load_model(folder)
