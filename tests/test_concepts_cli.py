"""`fseg-jax concepts import|build` through click's runner."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from fseg_jax.cli import main
from fseg_jax.concepts import load_concepts


def test_import_needs_trust_then_writes_a_bank(shared_data, tmp_path):
    src = shared_data / "concepts" / "uni.joblib"
    out = tmp_path / "uni.safetensors"
    runner = CliRunner()
    refused = runner.invoke(main, ["concepts", "import", str(src), "--preset", "uni", "-o", str(out)])
    assert refused.exit_code != 0 and "refusing to unpickle" in refused.output and not out.exists()
    ok = runner.invoke(main, ["concepts", "import", str(src), "--preset", "uni", "--trust-pickle", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    bank = load_concepts(out)
    assert bank.model == "uni" and bank.ks == (8, 16, 32, 64, 128, 256) and bank.feature_dim == 1024
    wrong = runner.invoke(
        main, ["concepts", "import", str(src), "--preset", "gigapath", "--trust-pickle", "-o", str(tmp_path / "g")]
    )
    assert wrong.exit_code == 1 and wrong.output.count("\n") == 1 and "Error:" in wrong.output
    assert "model gigapath has 1536" in wrong.output


def test_build_from_a_converted_model_folder(tmp_path):
    from flax import nnx
    from PIL import Image

    from fseg_jax.hub import save_model
    from fseg_jax.models.config import ViTConfig
    from fseg_jax.models.vit import VisionTransformer

    cfg = dataclasses.replace(ViTConfig.from_preset("uni"), depth=1, embed_dim=64, num_heads=2, mlp_hidden=128)
    model_dir = save_model(VisionTransformer(cfg, rngs=nnx.Rngs(0)), tmp_path / "tiny")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "bank.safetensors"
    runner = CliRunner()
    result = runner.invoke(
        main, ["concepts", "build", str(model_dir), str(images), "--k", "2,4", "--tile", "48", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    bank = load_concepts(out)
    # the bank records the folder (absolute), so `segment` can load the model from the bank alone
    assert bank.ks == (2, 4) and bank.feature_dim == 64 and bank.model == str(model_dir.resolve())
    too_many = runner.invoke(
        main, ["concepts", "build", str(model_dir), str(images), "--k", "64", "--tile", "48", "-o", str(out)]
    )
    assert too_many.exit_code == 1 and "fewer than the largest k (64)" in too_many.output
    bad_k = runner.invoke(main, ["concepts", "build", str(model_dir), str(images), "--k", "a,b", "-o", str(out)])
    assert bad_k.exit_code == 2 and "comma-separated list of integers" in bad_k.output


def test_build_unknown_model_is_one_clear_line(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    result = CliRunner().invoke(
        main, ["concepts", "build", "no_such_model", str(tmp_path / "x.png"), "-o", str(tmp_path / "b.safetensors")]
    )
    assert result.exit_code == 1 and result.output.startswith("Error: cannot load model no_such_model")
    assert result.output.count("\n") == 1


def test_random_model_options(tmp_path):
    out = str(tmp_path / "b.safetensors")
    runner = CliRunner()
    no_seed = runner.invoke(main, ["concepts", "build", "uni", "--sample", "--depth", "2", "-o", out])
    assert no_seed.exit_code == 2 and "--depth applies to --random-init models only" in no_seed.output
    no_images = runner.invoke(main, ["concepts", "build", "uni", "--random-init", "0", "-o", out])
    assert no_images.exit_code == 2 and "or --sample" in no_images.output
    too_deep = runner.invoke(main, ["concepts", "build", "uni", "--sample", "--random-init", "0", "--depth", "30",
                                    "-o", out])
    assert too_deep.exit_code == 1 and "depth must be an integer in [1, 24] for uni, got 30" in too_deep.output


def test_group_is_listed():
    result = CliRunner().invoke(main, ["concepts", "--help"])
    assert result.exit_code == 0 and "import" in result.output and "build" in result.output


def test_concepts_option_takes_the_mirror_from_the_environment_and_caches_where_the_library_does(
    shared_data, tmp_path, monkeypatch
):
    """One cache for upstream banks: what the command line fetched, the library finds (and the other way)."""
    import shutil

    from fseg_jax.cli.common import resolve_concepts_option
    from fseg_jax.concepts import default_cache_dir, resolve_concepts

    www = tmp_path / "www"
    www.mkdir()
    shutil.copy(shared_data / "concepts" / "resnet.joblib", www / "resnet.joblib")
    monkeypatch.setenv("FSEG_JAX_CONCEPTS_URL", www.as_uri())
    monkeypatch.setenv("FSEG_JAX_CACHE", str(tmp_path / "cache"))  # the compiled programs' cache only
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_concepts_option("resnet50").ks == (16, 32, 64, 128, 256)
    cached = default_cache_dir() / "resnet50-d8fe4411715f.safetensors"
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "home"))
    assert not (tmp_path / "cache" / "concepts").exists()
    shutil.rmtree(www)  # no download possible: the library reads the command line's cache
    assert resolve_concepts("resnet50", base_url=www.as_uri()).ks == (16, 32, 64, 128, 256)
