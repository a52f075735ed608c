"""load_model / save_model: converted directories, a fake Hugging Face cache in offline mode, access errors,
and the `fseg-jax convert` command."""

from __future__ import annotations

import dataclasses
import json
import shutil
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flax import nnx
from huggingface_hub import constants as hf_constants
from timm_models import fseg_config, make_timm_model, random_input, relative_error, save_hub_files, timm_intermediates

import fseg_jax.hub as hub
from fseg_jax import ViTConfig, VisionTransformer, load_model, save_model
from fseg_jax.cli import main
from fseg_jax.convert.engine import ConversionError
from fseg_jax.hub import ModelAccessError
from fseg_jax.models.weights import read_manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def h0_one_block(tmp_path_factory):
    """h0_mini reduced to one block: the timm model and its hub files."""
    timm_model = make_timm_model("h0_mini", depth=1)
    return timm_model, save_hub_files(timm_model, tmp_path_factory.mktemp("h0"))


def fake_hub_cache(root, preset, source, revision_dir=COMMIT):
    """A cache laid out like huggingface_hub's: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    manifest = read_manifest(preset)
    repo_dir = root / ("models--" + manifest["hf_repo"].replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision_dir
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision_dir)
    shutil.copy(source, snapshot / manifest["filename"])
    return root


def use_hf_home(monkeypatch, root, *, offline=True):
    """huggingface_hub's settings as ``HF_HOME=root`` and ``HF_HUB_OFFLINE`` give them when it is imported;
    returns the hub cache."""
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(hf_constants, "HF_ASSETS_CACHE", str(root / "assets"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    return root / "hub"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    # presets are reduced to one block so the test checkpoint stays small
    monkeypatch.setattr(hub, "config_from_preset", lambda name: fseg_config(name, depth=1))
    return use_hf_home(monkeypatch, tmp_path / "hf")


def test_save_and_load_directory_round_trip(tmp_path):
    config = ViTConfig("tiny", 8, 32, 2, 4, 64, reg_tokens=1, pos_embed_grid=(3, 3))
    model = VisionTransformer(config, rngs=nnx.Rngs(3))
    save_model(model, tmp_path / "tiny")
    assert json.loads((tmp_path / "tiny" / "config.json").read_text())["config"]["name"] == "tiny"
    loaded = load_model(tmp_path / "tiny")
    assert loaded.config == config
    x = random_input(16, 32)
    np.testing.assert_array_equal(np.asarray(loaded.forward_intermediates(x)[-1]),
                                  np.asarray(model.forward_intermediates(x)[-1]))


def test_load_preset_from_offline_hub_cache_converts_once(offline, h0_one_block, monkeypatch):
    timm_model, paths = h0_one_block
    fake_hub_cache(offline, "h0_mini", paths["bin"])
    model = load_model("h0_mini")
    x = random_input(28, 42)
    ref, _ = timm_intermediates(timm_model, x)
    assert relative_error(model.forward_intermediates(x)[-1], ref[-1]) <= 1e-4
    # converted into huggingface_hub's assets cache, not into its hub cache
    converted = offline.parent / "assets" / "fseg_jax" / "h0_mini" / COMMIT
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors"]
    assert not (offline / "fseg_jax").exists()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the converted cache should have been used")

    monkeypatch.setattr(hub, "convert_checkpoint", no_conversion)
    again = load_model("h0_mini")
    np.testing.assert_array_equal(np.asarray(again.forward_intermediates(x)[-1]),
                                  np.asarray(model.forward_intermediates(x)[-1]))


def test_explicit_cache_folders_and_a_new_revision_converted_again(h0_one_block, tmp_path, monkeypatch):
    _, paths = h0_one_block
    use_hf_home(monkeypatch, tmp_path / "default")
    monkeypatch.setattr(hub, "config_from_preset", lambda name: fseg_config(name, depth=1))
    conversions = []
    convert = hub.convert_checkpoint
    monkeypatch.setattr(hub, "convert_checkpoint", lambda *a, **kw: conversions.append(a) or convert(*a, **kw))
    hub_dir = fake_hub_cache(tmp_path / "hub", "h0_mini", paths["bin"])
    other = "f" * 40
    snapshot = next(hub_dir.glob("models--*")) / "snapshots" / other
    snapshot.mkdir()
    shutil.copy(paths["bin"], snapshot / read_manifest("h0_mini")["filename"])
    folders = dict(cache_dir=tmp_path / "hub", assets_dir=tmp_path / "assets")
    for revision in (None, None, other):
        load_model("h0_mini", revision=revision, **folders)
    assert len(conversions) == 2  # once per commit
    assert sorted(p.name for p in (tmp_path / "assets" / "fseg_jax" / "h0_mini").iterdir()) == [COMMIT, other]
    assert not (tmp_path / "default").exists()


def test_offline_without_cached_checkpoint_says_so(offline):
    with pytest.raises(ModelAccessError, match="offline mode"):
        load_model("uni")


def test_gated_repository_explains_login(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = types.SimpleNamespace(headers={}, request=None)
        raise GatedRepoError("401 Client Error: access to model MahmoodLab/uni is restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(ModelAccessError) as err:
        load_model("uni", cache_dir=tmp_path)
    message = str(err.value)
    assert "MahmoodLab/uni" in message and "hf auth login" in message and "huggingface-cli login" in message
    assert "accept" in message


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="neither a converted model directory nor a preset"):
        load_model("not_a_model")


def test_damaged_directories_are_reported(tmp_path):
    config = ViTConfig("tiny", 8, 32, 1, 4, 64, pos_embed_grid=(2, 2))
    good = save_model(VisionTransformer(config, rngs=nnx.Rngs(0)), tmp_path / "good")

    no_config = shutil.copytree(good, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json is missing"):
        load_model(no_config)

    corrupt = shutil.copytree(good, tmp_path / "corrupt")
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ConversionError, match="cannot read"):
        load_model(corrupt)

    wrong = shutil.copytree(good, tmp_path / "wrong")
    meta = json.loads((wrong / "config.json").read_text())
    meta["config"]["depth"] = 2  # the weights hold one block: every parameter of block 1 is missing
    meta["config"]["embed_dim"] = 48  # and every width disagrees
    (wrong / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError) as err:
        load_model(wrong)
    assert "missing key for parameter 'blocks.1.attn.qkv.kernel'" in str(err.value)
    assert "shape mismatch for 'norm.scale'" in str(err.value)

    unknown = shutil.copytree(good, tmp_path / "unknown")
    meta = json.loads((unknown / "config.json").read_text())
    meta["config"]["qk_norm"] = True
    (unknown / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="unknown ViTConfig field"):
        load_model(unknown)


def test_cli_convert_timm_config_and_preset(h0_one_block, tmp_path):
    timm_model, paths = h0_one_block
    spec = read_manifest("h0_mini")["timm"]
    timm_config = {"architecture": spec["architecture"],
                   "model_args": {**spec["model_args"], "depth": 1, "num_classes": 0, "dynamic_img_size": True}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(timm_config))
    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--timm-config", str(tmp_path / "cfg" / "config.json"),
                                  "--checkpoint", str(paths["safetensors"]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "depth 1, width 768, patch 14" in result.output
    model = load_model(tmp_path / "out")
    x = random_input(28, 42)
    ref, _ = timm_intermediates(timm_model, x)
    assert relative_error(model.forward_intermediates(x)[-1], ref[-1]) <= 1e-4

    # a preset whose depth does not match the checkpoint: one clear error, non-zero exit
    result = runner.invoke(main, ["convert", "--preset", "h0_mini", "--checkpoint", str(paths["bin"]),
                                  "--out", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "missing key for parameter 'blocks.11" in result.output

    timm_config["model_args"]["qk_norm"] = True
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(timm_config))
    result = runner.invoke(main, ["convert", "--timm-config", str(tmp_path / "cfg" / "config.json"),
                                  "--checkpoint", str(paths["safetensors"]), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "qk_norm" in result.output

    result = runner.invoke(main, ["convert", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "exactly one of --preset and --timm-config" in result.output

    result = runner.invoke(main, ["convert", "--preset", "h0_mini", "--checkpoint", str(paths["bin"]),
                                  "--revision", "abc", "--out", str(tmp_path / "z")])
    assert result.exit_code == 2 and "--revision selects a hub download" in result.output



def test_cli_convert_random_init(tmp_path):
    spec = read_manifest("uni")["timm"]
    timm_config = {"architecture": spec["architecture"], "model_args": {**spec["model_args"], "depth": 1}}
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    runner = CliRunner()
    args = ["convert", "--timm-config", str(tmp_path / "config.json"), "--random-init", "3"]
    result = runner.invoke(main, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "random weights (seed 3)" in result.output
    model = load_model(tmp_path / "out")
    expected = VisionTransformer(model.config, rngs=nnx.Rngs(3))
    x = random_input(32, 48)
    np.testing.assert_array_equal(np.asarray(model.forward_intermediates(x)[-1]),
                                  np.asarray(expected.forward_intermediates(x)[-1]))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]

    result = runner.invoke(main, [*args, "--checkpoint", str(tmp_path / "config.json"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--random-init makes weights without a checkpoint" in result.output


def test_cli_convert_random_init_is_the_library_random_model(tmp_path):
    """`convert --preset P --random-init S --depth N` writes what `random_model(P, seed=S, depth=N)` builds, under
    its name `P-random`, so a bank built with either records one model."""
    from fseg_jax.hub import random_model

    runner = CliRunner()
    result = runner.invoke(main, ["convert", "--preset", "kaiko_vits16", "--random-init", "2", "--depth", "2",
                                  "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model, expected = load_model(tmp_path / "out"), random_model("kaiko_vits16", seed=2, depth=2)
    assert model.config == expected.config and model.config.name == "kaiko_vits16-random"
    x = random_input(32, 32)
    np.testing.assert_array_equal(np.asarray(model.forward_intermediates(x)[-1]),
                                  np.asarray(expected.forward_intermediates(x)[-1]))
    result = runner.invoke(main, ["convert", "--preset", "kaiko_vits16", "--depth", "2", "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "--depth applies to --random-init models only" in result.output


def test_cli_convert_resnet50(tmp_path):
    from safetensors.torch import save_file
    from timm_models import make_torchvision_resnet50

    tv = make_torchvision_resnet50()
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(tmp_path / "model.safetensors"))
    result = CliRunner().invoke(main, ["convert", "--preset", "resnet50", "--checkpoint",
                                       str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "rn")])
    assert result.exit_code == 0, result.output
    model = load_model(tmp_path / "rn")
    assert dataclasses.asdict(model.config)["embed_dim"] == 1024
    x = random_input(64, 96)
    with torch.no_grad():
        y = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        y = tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(y)))))))
    (ours,) = model.forward_intermediates(x, indices=[-1])
    assert relative_error(ours, y.permute(0, 2, 3, 1).numpy()) <= 1e-5


def test_a_first_load_in_bfloat16_caches_the_checkpoint_values(offline, h0_one_block):
    timm_model, paths = h0_one_block
    fake_hub_cache(offline, "h0_mini", paths["bin"])
    half = load_model("h0_mini", param_dtype=jnp.bfloat16)  # converts, caches, then stores in bfloat16
    assert half.blocks[0].mlp.fc1.kernel.get_value().dtype == jnp.bfloat16
    full = load_model("h0_mini")  # from the converted cache: the float32 values of the checkpoint
    expected = timm_model.state_dict()["blocks.0.attn.qkv.weight"].numpy().T
    np.testing.assert_array_equal(np.asarray(full.blocks[0].attn.qkv.kernel.get_value()), expected)
