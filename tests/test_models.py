"""Model behaviour beyond timm parity: configs, ResNet-50 layer3, jit tracing, attention paths, dtypes."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from timm_models import make_torchvision_resnet50, random_input, relative_error
from tiny_models import tiny_config, tiny_vit

from fseg_jax import ResNet50, ViTConfig, VisionTransformer, convert_timm_state_dict
from fseg_jax.models import with_compute_dtype
from fseg_jax.models.config import ResNetConfig
from fseg_jax.models.weights import read_manifest

PRESETS = ["uni", "uni2_h", "gigapath", "virchow", "virchow2", "h_optimus_0", "h_optimus_1", "h0_mini", "mstar",
           "kaiko_vits16", "kaiko_vits8", "kaiko_vitb16", "kaiko_vitb8", "lunit_vits8", "gpfm", "kaiko_vitl14"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_matches_its_manifest_timm_arguments(preset):
    """The explicit preset equals what from_timm derives from the manifest's timm arguments."""
    manifest = read_manifest(preset)
    derived = ViTConfig.from_timm(manifest["timm"], name=preset)
    preset_config = ViTConfig.from_preset(preset)
    assert dataclasses.replace(derived, mean=preset_config.mean, std=preset_config.std) == preset_config
    assert manifest["hf_repo"] and manifest["filename"] and manifest["license"] and manifest["revision"]


def test_preset_facts():
    uni = ViTConfig.from_preset("uni")
    assert (uni.patch_size, uni.embed_dim, uni.depth, uni.num_prefix_tokens) == (16, 1024, 24, 1)
    giga = ViTConfig.from_preset("gigapath")
    assert (giga.patch_size, giga.embed_dim, giga.depth, giga.num_heads, giga.mlp_hidden) == (16, 1536, 40, 24, 8192)
    assert ViTConfig.from_preset("uni2_h").num_prefix_tokens == 9
    assert ViTConfig.from_preset("virchow2").num_pos_tokens == 261
    assert ViTConfig.from_preset("h_optimus_0").num_pos_tokens == 256
    assert read_manifest("h0_mini")["verified"] is False
    with pytest.raises(ValueError, match="unknown ViT preset 'nope'"):
        ViTConfig.from_preset("nope")


def test_from_timm_refuses_unknown_arguments():
    config = {"architecture": "vit_large_patch16_224",
              "model_args": {"init_values": 1e-5, "qk_norm": True, "frobnicate": 3, "global_pool": "avg"}}
    with pytest.raises(ValueError) as err:
        ViTConfig.from_timm(config)
    message = str(err.value)
    assert "frobnicate" in message and "qk_norm" in message and "global_pool" in message
    with pytest.raises(ValueError, match="unsupported timm architecture"):
        ViTConfig.from_timm({"architecture": "vit_so400m_patch14_siglip_224"})
    # hub-style config with pretrained_cfg mean/std and inert arguments
    parsed = ViTConfig.from_timm({"architecture": "vit_large_patch16_224", "num_classes": 0,
                                  "model_args": {"dynamic_img_size": True, "num_classes": 0},
                                  "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}})
    assert parsed.mean == (0.5, 0.5, 0.5) and not parsed.layer_scale


def test_config_round_trips_through_dict():
    for preset in PRESETS:
        config = ViTConfig.from_preset(preset)
        assert ViTConfig.from_dict(config.to_dict()) == config
    assert ResNetConfig.from_dict(ResNetConfig().to_dict()) == ResNetConfig()


def test_resnet50_layer3_matches_torchvision():
    tv = make_torchvision_resnet50()
    model = convert_timm_state_dict(tv.state_dict(), ResNetConfig())
    x = random_input(96, 160, batch=2)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(xt))))
        refs = []
        for layer in (tv.layer1, tv.layer2, tv.layer3):
            y = layer(y)
            refs.append(y.permute(0, 2, 3, 1).numpy())
    ours = model.forward_intermediates(x)
    assert [o.shape for o in ours] == [(2, 24, 40, 256), (2, 12, 20, 512), (2, 6, 10, 1024)]
    for o, r in zip(ours, refs):
        assert relative_error(o, r) <= 1e-5
    (last,) = model.forward_intermediates(x, indices=[-1])
    np.testing.assert_array_equal(np.asarray(last), np.asarray(ours[-1]))
    # the same weights computing in bfloat16: a bfloat16 output near torchvision's, the model itself untouched
    (low,) = with_compute_dtype(model, jnp.bfloat16).forward_intermediates(x, indices=[-1])
    assert low.dtype == jnp.bfloat16 and model.dtype is None
    assert relative_error(np.asarray(low, np.float32), refs[-1]) < 5e-2
    assert model.config.patch_size == 16 and model.config.embed_dim == 1024


def test_indices_semantics_and_errors():
    model = tiny_vit()
    x = random_input(16, 24)
    every = model.forward_intermediates(x)
    assert len(every) == 3 and every[0].shape == (1, 2, 3, 32)
    last_two = model.forward_intermediates(x, indices=2)
    np.testing.assert_allclose(last_two[0], every[1], atol=1e-6)
    picked = model.forward_intermediates(x, indices=[-1, 0])
    np.testing.assert_allclose(picked[0], every[2], atol=1e-6)
    np.testing.assert_allclose(picked[1], every[0], atol=1e-6)
    for bad in (0, 4, [3], [-4]):
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model.forward_intermediates(random_input(20, 24))


def test_jit_compiles_once_per_input_shape():
    graphdef, state = nnx.split(tiny_vit())

    @chex.assert_max_traces(n=2)
    def features(state, x):
        return nnx.merge(graphdef, state).forward_intermediates(x, indices=[-1])[0]

    fn = jax.jit(features)
    for seed in range(3):
        chex.assert_shape(fn(state, random_input(16, 24, seed=seed)), (1, 2, 3, 32))
    fn(state, random_input(24, 16)).block_until_ready()
    fn(state, random_input(24, 16, seed=5)).block_until_ready()
    with pytest.raises(AssertionError, match="traced > 2 times"):
        fn(state, random_input(32, 16))


def test_attention_implementations_and_bfloat16_agree():
    config = tiny_config(depth=2)
    reference = tiny_vit(config, attention_impl="chunked")
    _, state = nnx.split(reference)
    x = random_input(32, 40, batch=2)
    expected = reference.forward_intermediates(x)[-1]
    xla = nnx.merge(nnx.split(VisionTransformer(config, rngs=nnx.Rngs(1), attention_impl="xla"))[0], state)
    assert relative_error(xla.forward_intermediates(x)[-1], expected) < 1e-5
    bf16 = with_compute_dtype(reference, jnp.bfloat16)
    out = bf16.forward_intermediates(x)[-1]
    assert out.dtype == jnp.bfloat16
    # bfloat16 keeps 8 bits of mantissa: about 0.4% per rounding, a few percent after two blocks
    assert relative_error(np.asarray(out, np.float32), expected) < 5e-2
    with pytest.raises(ValueError, match="attention_impl"):
        VisionTransformer(config, rngs=nnx.Rngs(0), attention_impl="flash")


def test_resnet_protocol_guards():
    model = nnx.eval_shape(lambda: ResNet50(rngs=nnx.Rngs(0)))  # the guards run before any weight is used
    with pytest.raises(ValueError, match="no final norm"):
        model.forward_intermediates(random_input(32, 32), norm=True)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.forward_intermediates(random_input(40, 32))
