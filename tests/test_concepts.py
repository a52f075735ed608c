"""Concept banks: the data class, the safetensors format, the joblib import, preset fetching and building."""

from __future__ import annotations

import dataclasses
import shutil
import sys
import types
import warnings
from pathlib import Path

import joblib
import numpy as np
import pytest

from fseg_jax.concepts import (
    ConceptBank,
    build_concepts,
    check_compatible,
    import_joblib_concepts,
    load_concepts,
    resolve_concepts,
    save_concepts,
    upstream,
)


def _bank(ks=(2, 4), d=6, model="uni", layer=-1, seed=0):
    rng = np.random.default_rng(seed)
    return ConceptBank({k: rng.random((k, d), dtype=np.float32) for k in ks}, model=model, layer=layer)


# ------------------------------------------------------------------------------------------------ data class


def test_bank_copies_sorts_and_freezes():
    raw = {4: np.ones((4, 3), np.float64), 2: np.zeros((2, 3), np.float32)}
    bank = ConceptBank(raw, model="uni", layer=[-1])
    assert bank.ks == (2, 4) and bank.feature_dim == 3 and bank.layer == -1
    assert bank[4].dtype == np.float32 and not bank[4].flags.writeable
    raw[4][0, 0] = 7.0  # the caller's array stays theirs
    assert bank[4][0, 0] == 1.0
    assert 2 in bank and 3 not in bank
    with pytest.raises(ValueError, match="k=3 is not in this concept bank; available: 2, 4"):
        bank[3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.model = "x"
    assert "ks=(2, 4)" in repr(bank) and "feature_dim=3" in repr(bank)
    assert ConceptBank(raw, model="uni").layer is None
    assert ConceptBank({1: np.ones((1, 2))}, layer=(-4, -1)).layer == (-4, -1)


@pytest.mark.parametrize(
    "concepts, message",
    [
        ({}, "empty"),
        ([np.ones((2, 3))], "expected a dict"),
        ({2: np.ones((3, 3))}, r"k=2: expected shape \(2, d\)"),
        ({2: np.ones(2)}, r"expected shape \(2, d\)"),
        ({2: np.ones((2, 3)), 4: np.ones((4, 5))}, "feature dimensions differ"),
        ({2: np.array([[1.0, np.nan], [0.0, 0.0]])}, "NaN"),
        ({True: np.ones((1, 3))}, "not a positive integer"),
        ({"8": np.ones((8, 3))}, "not a positive integer"),
        ({2: np.array([["a", "b"], ["c", "d"]])}, "real numbers"),
    ],
)
def test_bank_validation(concepts, message):
    with pytest.raises(ValueError, match=message):
        ConceptBank(concepts)


def test_check_compatible_names_both_models():
    bank = _bank(model="resnet50")
    with pytest.raises(ValueError, match=r"resnet50 has feature dimension 6, but model uni gives 1024"):
        check_compatible(bank, 1024, model_name="uni")
    with pytest.warns(UserWarning, match="made for model 'resnet50' but is used with 'uni'"):
        check_compatible(bank, 6, model_name="uni")
    with pytest.warns(UserWarning, match="layer"):
        check_compatible(bank, 6, layer=-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(bank, 6, model_name="resnet50", layer=-1)


# ---------------------------------------------------------------------------------------------- file format


@pytest.mark.parametrize("model, layer", [("uni", -1), (None, None), ("custom", (-4, -1))])
def test_save_load_round_trip(tmp_path, model, layer):
    bank = _bank(ks=(8, 2, 16), model=model, layer=layer)
    path = save_concepts(tmp_path / "bank.safetensors", bank)
    loaded = load_concepts(path)
    assert loaded == bank and loaded.model == model and loaded.layer == layer
    # atomic write: overwriting leaves exactly the final file, no temporaries
    save_concepts(path, _bank(seed=1))
    assert load_concepts(path) == _bank(seed=1)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]
    assert load_concepts(save_concepts(tmp_path / "new" / "dir" / "b.safetensors", bank)) == bank


def test_file_holds_one_tensor_per_k_and_metadata(tmp_path):
    from safetensors import safe_open

    path = save_concepts(tmp_path / "b.safetensors", _bank(ks=(2, 4)))
    with safe_open(str(path), framework="numpy") as f:
        assert sorted(f.keys()) == ["k2", "k4"]
        meta = f.metadata()
    assert meta == {
        "format": "fseg_jax.concepts", "format_version": "1", "feature_dim": "6", "ks": "2,4",
        "model": "uni", "layer": "-1",
    }


def test_corrupt_and_foreign_files(tmp_path, shared_data):
    from safetensors.numpy import save_file

    good = save_concepts(tmp_path / "good.safetensors", _bank())
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-10])
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank at all" * 3)
    save_file({"weight": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    save_file({"k2": np.ones((2, 3), np.float64)}, str(tmp_path / "f64.safetensors"),
              metadata={"format": "fseg_jax.concepts", "format_version": "1", "feature_dim": "3", "ks": "2"})
    save_file({"k2": np.ones((2, 3), np.float32)}, str(tmp_path / "v9.safetensors"),
              metadata={"format": "fseg_jax.concepts", "format_version": "9", "feature_dim": "3", "ks": "2"})
    save_file({"k2": np.ones((3, 3), np.float32)}, str(tmp_path / "rows.safetensors"),
              metadata={"format": "fseg_jax.concepts", "format_version": "1", "feature_dim": "3", "ks": "2"})
    cases = {
        "trunc": "not a readable safetensors concept bank",
        "junk": "not a readable safetensors concept bank",
        "model": "not a concept bank",
        "f64": "dtype float64",
        "v9": "version '9' is not supported",
        "rows": r"expected shape \(2, d\)",
    }
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_concepts(tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="looks like a pickle"):
        load_concepts(shared_data / "concepts" / "uni.joblib")
    with pytest.raises(FileNotFoundError, match="concept bank not found"):
        load_concepts(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------- joblib import


def test_import_refuses_without_opt_in(shared_data):
    with pytest.raises(ValueError, match="refusing to unpickle .*trust_pickle=True"):
        import_joblib_concepts(shared_data / "concepts" / "uni.joblib")


def test_import_upstream_banks(shared_data, tmp_path):
    for file, preset, ks, dim in [
        ("uni.joblib", "uni", (8, 16, 32, 64, 128, 256), 1024),
        ("prov_gigapath.joblib", "gigapath", (8, 16, 32, 64, 128, 256), 1536),
        ("resnet.joblib", "resnet50", (16, 32, 64, 128, 256), 1024),
    ]:
        src = shared_data / "concepts" / file
        bank = import_joblib_concepts(src, trust_pickle=True, model=preset)
        assert (bank.ks, bank.feature_dim, bank.model, bank.layer) == (ks, dim, preset, -1)
        raw = joblib.load(src)
        for k in ks:
            np.testing.assert_array_equal(bank[k], raw[k])
        assert load_concepts(save_concepts(tmp_path / f"{preset}.safetensors", bank)) == bank
    with pytest.raises(ValueError, match="1024-dimensional concepts, but model gigapath has 1536"):
        import_joblib_concepts(shared_data / "concepts" / "uni.joblib", trust_pickle=True, model="gigapath")


def test_import_validates_content(tmp_path):
    joblib.dump([1, 2, 3], tmp_path / "list.joblib")
    joblib.dump({8: np.ones((7, 4), np.float32), 4: np.ones((4, 4), np.float32), "x": 1}, tmp_path / "bad.joblib")
    (tmp_path / "junk.joblib").write_bytes(b"\x80\x04 definitely not a pickle")
    with pytest.raises(ValueError, match="expected a dict"):
        import_joblib_concepts(tmp_path / "list.joblib", trust_pickle=True)
    with pytest.raises(ValueError, match=r"k=8: expected shape \(8, d\), got \(7, 4\); key 'x'"):
        import_joblib_concepts(tmp_path / "bad.joblib", trust_pickle=True)
    with pytest.raises(ValueError, match="cannot read .* as a joblib concept bank"):
        import_joblib_concepts(tmp_path / "junk.joblib", trust_pickle=True)
    with pytest.raises(FileNotFoundError):
        import_joblib_concepts(tmp_path / "missing.joblib", trust_pickle=True)


def test_import_without_joblib_names_the_extra(shared_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "joblib", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs joblib: pip install 'fseg_jax\[pickle\]'"):
        import_joblib_concepts(shared_data / "concepts" / "uni.joblib", trust_pickle=True)


# ------------------------------------------------------------------------------------------- presets


@pytest.fixture
def served(tmp_path):
    """A local folder standing in for the upstream one (a file:// mirror), and where to cache."""
    www = tmp_path / "www"
    www.mkdir()
    return types.SimpleNamespace(www=www, options=dict(base_url=www.as_uri(), cache_dir=tmp_path / "cache"),
                                 cache=tmp_path / "cache")


def test_preset_fetched_once_checked_and_cached(served, shared_data):
    from fseg_jax.models.config import config_from_preset

    shutil.copy(shared_data / "concepts" / "resnet.joblib", served.www / "resnet.joblib")
    bank = resolve_concepts("resnet50", model_config=config_from_preset("resnet50"), **served.options)
    assert bank.model == "resnet50" and bank.ks == (16, 32, 64, 128, 256) and bank.feature_dim == 1024
    assert sorted(str(p.relative_to(served.cache)) for p in served.cache.rglob("*")) == [
        "downloads", "downloads/resnet.joblib", "resnet50-d8fe4411715f.safetensors",
    ]
    (served.www / "resnet.joblib").unlink()  # no second download: the cache answers
    assert resolve_concepts("resnet", **served.options) == bank
    (served.cache / "resnet50-d8fe4411715f.safetensors").write_bytes(b"damaged")
    assert resolve_concepts("resnet", **served.options) == bank  # converted again from the checked download
    with pytest.raises(ValueError, match="feature dimension 1024, but model gigapath gives 1536"):
        resolve_concepts("resnet50", model_config=config_from_preset("gigapath"), **served.options)


def test_preset_with_wrong_hash_is_not_unpickled(served, shared_data, monkeypatch):
    shutil.copy(shared_data / "concepts" / "uni.joblib", served.www / "prov_gigapath.joblib")
    monkeypatch.setattr(upstream, "import_joblib_concepts", lambda *a, **k: pytest.fail("unpickled a mismatching file"))
    with pytest.raises(ValueError, match=r"prov_gigapath.joblib does not match the pinned sha256 82f3cf7c\w+ of the "
                                         "gigapath concept bank, so it was not unpickled"):
        resolve_concepts("gigapath", **served.options)
    assert not any(p.is_file() for p in served.cache.rglob("*"))  # the mismatching download is deleted


def test_tampered_cached_download_is_fetched_again(served, shared_data):
    downloads = served.cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / "resnet.joblib").write_bytes(b"\x80 tampered")
    with pytest.raises(OSError, match="could not download .*resnet.joblib"):  # checked, and not found upstream
        resolve_concepts("resnet50", **served.options)
    shutil.copy(shared_data / "concepts" / "resnet.joblib", served.www / "resnet.joblib")
    assert resolve_concepts("resnet50", **served.options).ks == (16, 32, 64, 128, 256)
    assert (downloads / "resnet.joblib").read_bytes() == (served.www / "resnet.joblib").read_bytes()


def test_preset_download_failure_is_clear(served):
    with pytest.raises(OSError, match="could not download .*uni.joblib"):
        resolve_concepts("uni", **served.options)
    # an https mirror that refuses the connection (nothing listens on port 1 of this machine)
    with pytest.raises(OSError, match=r"could not download https://127.0.0.1:1/uni.joblib \(.*\); fetch the file"):
        resolve_concepts("uni", base_url="https://127.0.0.1:1/", cache_dir=served.cache)


def test_default_cache_ignores_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FSEG_JAX_CACHE", str(tmp_path))
    assert upstream.default_cache_dir() == Path.home() / ".cache" / "fseg_jax" / "concepts"


def test_resolve_paths_and_bad_specs(tmp_path):
    path = save_concepts(tmp_path / "b.safetensors", _bank())
    assert resolve_concepts(str(path)) == _bank()
    assert resolve_concepts(path) == _bank()
    bank = _bank()
    assert resolve_concepts(bank) is bank
    with pytest.raises(ValueError, match="no such file, and not a preset"):
        resolve_concepts(str(tmp_path / "nope.safetensors"))
    with pytest.raises(TypeError):
        resolve_concepts(3)


# ------------------------------------------------------------------------------------------- building


@pytest.fixture(scope="module")
def tiny_vit():
    from flax import nnx

    from fseg_jax.models.config import ViTConfig
    from fseg_jax.models.vit import VisionTransformer

    cfg = dataclasses.replace(ViTConfig.from_preset("uni"), depth=1, embed_dim=64, num_heads=2, mlp_hidden=128)
    return VisionTransformer(cfg, rngs=nnx.Rngs(0))


def _images(n=2, h=96, w=150, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (n, h // 16, w // 16, 3), dtype=np.uint8)
    # blocky pictures plus noise: tiles differ from each other
    img = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)
    img = np.pad(img, ((0, 0), (0, h - img.shape[1]), (0, w - img.shape[2]), (0, 0)), mode="edge")
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _manual_tile_features(model, images, tile):
    """(tiles, h, w, D) ReLU'd token features of the non-overlapping tiles, in build order."""
    from fseg_jax.features import preprocess, token_features

    tiles = [im[y:y + tile, x:x + tile] for im in images
             for y in range(0, im.shape[0] - tile + 1, tile) for x in range(0, im.shape[1] - tile + 1, tile)]
    return np.asarray(token_features(model, preprocess(np.stack(tiles), model.config), -1))


def _sorted_rows(a):
    return a[np.lexsort(a.T[::-1])]


def test_build_uses_per_tile_mean_features(tiny_vit):
    images = _images()
    before = images.copy()
    # 2 images of 96x150 in 48 px tiles: 2 x 3 tiles each (the 6 px border is left out) -> 12 tiles
    bank = build_concepts(tiny_vit, images, ks=(12, 3), tile=48, batch=5)
    np.testing.assert_array_equal(images, before)
    assert bank.ks == (3, 12) and bank.feature_dim == 64 and bank.model == "uni" and bank.layer == -1
    feats = _manual_tile_features(tiny_vit, images, 48).mean(axis=(1, 2))
    # with k == number of tiles every tile is its own centre
    np.testing.assert_allclose(_sorted_rows(bank[12]), _sorted_rows(feats), rtol=1e-4, atol=1e-5)
    assert (bank[3] >= 0).all()


def test_build_reads_float_and_16_bit_images_as_segment_does(tiny_vit):
    """The one image policy: a float (or 16-bit) image is not quantised to 8 bits before its features, as
    segment does not quantise it; an 8-bit image in the same list keeps its own batch."""
    from fseg_jax.concepts import collect_features

    image = _images()[0]
    smooth = (image.astype(np.float32) + 0.37) / 256.0  # values between the 8-bit levels
    _, _, x_nd = collect_features(tiny_vit, [smooth, image], tile=48, per_token=True, batch=4)
    tokens = lambda im: _manual_tile_features(tiny_vit, [im], 48).reshape(-1, 64)  # noqa: E731
    np.testing.assert_allclose(x_nd, np.concatenate([tokens(smooth), tokens(image)]), rtol=1e-5, atol=1e-6)
    quantised = tokens((np.clip(smooth, 0, 1) * 255).round().astype(np.uint8))
    assert np.abs(x_nd[: len(quantised)] - quantised).max() > 1e-3


def test_build_is_deterministic_and_reads_folders(tiny_vit, tmp_path):
    from PIL import Image

    images = _images(n=3, seed=1)
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"im{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    a = build_concepts(tiny_vit, tmp_path, ks=(2, 4), tile=48, seed=5)
    b = build_concepts(tiny_vit, list(images), ks=(2, 4), tile=48, seed=5)
    assert a == b


def test_build_per_token(tiny_vit):
    images = _images(n=1)
    # one 96x150 image in 48 px tiles: 6 tiles of 3 x 3 tokens
    tokens = _manual_tile_features(tiny_vit, images, 48).reshape(6, 9, 64)
    # with k == number of tokens every token is its own centre
    bank = build_concepts(tiny_vit, images[0], ks=(54,), tile=48, per_token=True)
    np.testing.assert_allclose(_sorted_rows(bank[54]), _sorted_rows(tokens.reshape(54, 64)), rtol=1e-4, atol=1e-5)
    # 5 tokens kept per tile: every centre is a token, 5 from each tile
    bank = build_concepts(tiny_vit, images[0], ks=(4, 30), tile=48, per_token=True, tokens_per_tile=5)
    assert bank.ks == (4, 30) and bank.feature_dim == 64
    dist = np.abs(bank[30][:, None, None, :] - tokens[None]).max(-1)  # (centre, tile, token)
    assert dist.min(axis=(1, 2)).max() <= 1e-4
    from_tile = np.array([np.unravel_index(np.argmin(d), d.shape)[0] for d in dist])
    assert np.bincount(from_tile, minlength=6).tolist() == [5] * 6
    with pytest.raises(ValueError, match="tokens_per_tile needs per_token"):
        build_concepts(tiny_vit, images, ks=(4,), tile=48, tokens_per_tile=5)


def test_build_bad_inputs(tiny_vit, tmp_path):
    images = _images(n=1)
    with pytest.raises(ValueError, match="multiple of the model's patch size 16"):
        build_concepts(tiny_vit, images, ks=(2,), tile=40)
    with pytest.raises(ValueError, match="found 6 tiles of 48x48 px, fewer than the largest k \\(8\\)"):
        build_concepts(tiny_vit, images, ks=(2, 8), tile=48)
    with pytest.raises(ValueError, match="found 0 tiles"):
        build_concepts(tiny_vit, images, ks=(2,), tile=48, tile_filter=lambda t: False)
    with pytest.raises(ValueError, match="no image files"):
        build_concepts(tiny_vit, tmp_path, ks=(2,), tile=48)
