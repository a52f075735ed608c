"""The call users write, `fseg_jax.segment(images, bank)`: the model the bank records, models by preset name or
folder (loaded once per process), one Pipeline behind every front end, one concept check, one NMF start."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny_config, tiny_vit

import fseg_jax
import fseg_jax.hub as hub
from fseg_jax.cli import main
from fseg_jax.concepts import ConceptBank, save_concepts
from fseg_jax.data import sample_image
from fseg_jax.features import preprocess, token_features
from fseg_jax.hub import load_model, resolve_model, save_model
from fseg_jax.factorization import factorize, project, random_init
from fseg_jax.segmentation import Pipeline, make_token_fn, segment

D = 32


# two blocks, patch 16, no registers; LayerScale gammas in [0.1, 1] (tiny_models), so the blocks visibly change
# the tokens
CONFIG = tiny_config(patch_size=16, embed_dim=D, depth=2, num_heads=2, reg_tokens=0)


@pytest.fixture(scope="module")
def image():
    return sample_image()[:96, :160]  # a 6 x 10 token crop of the packaged H&E sample


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(tiny_vit(CONFIG), tmp_path_factory.mktemp("api") / "tiny-model")


@pytest.fixture(scope="module")
def concepts():
    return np.abs(np.random.default_rng(1).standard_normal((5, D))).astype(np.float32)


# --- the model a bank records ----------------------------------------------------------------------------------


def test_segment_takes_the_model_the_bank_records(model_dir, image, tmp_path):
    bank = fseg_jax.build_concepts(str(model_dir), image, ks=(4,), tile=32)
    assert bank.model == str(model_dir.resolve()) and bank.layer == -1
    # a model object loaded from the folder is recorded the same way
    assert fseg_jax.build_concepts(load_model(model_dir), image, ks=(4,), tile=32) == bank
    path = save_concepts(tmp_path / "bank.safetensors", bank)

    labels = fseg_jax.segment(image, path)
    np.testing.assert_array_equal(labels, segment(image, bank, model=load_model(model_dir)))
    assert labels.shape == image.shape[:2] and len(np.unique(labels)) > 1

    out = tmp_path / "out"
    _save_png(image, tmp_path / "img.png")
    res = CliRunner().invoke(main, ["segment", str(tmp_path / "img.png"), "--concepts", str(path), "-o", str(out),
                                    "--no-compilation-cache"])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.load(out / "img_labels.npy"), labels)


def _save_png(image, path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


@pytest.mark.parametrize(
    "bank_model,message",
    [
        (None, "no model given and the concept bank records none: pass model="),
        ("/no/such/folder/any/more", "made with the model in /no/such/folder/any/more, which no longer exists: pass model="),
        ("tiny", "records model 'tiny', which is neither a preset nor a directory: pass model="),
    ],
)
def test_no_model_to_find_says_what_to_pass(concepts, image, bank_model, message):
    bank = ConceptBank({5: concepts}, model=bank_model, layer=-1)
    with pytest.raises(ValueError) as err:
        segment(image, bank)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_array_or_dff_without_a_model_says_what_to_pass(concepts, image):
    with pytest.raises(ValueError, match="a concepts array records no model: pass model="):
        segment(image, concepts)
    with pytest.raises(ValueError, match="method 'dff' uses no concept bank: pass model="):
        make_token_fn(None, None, k=3, method="dff")


def test_cli_without_model_and_a_bank_without_one(concepts, tmp_path, image):
    path = save_concepts(tmp_path / "bank.safetensors", ConceptBank({5: concepts}, model=None))
    _save_png(image, tmp_path / "img.png")
    res = CliRunner().invoke(main, ["segment", str(tmp_path / "img.png"), "--concepts", str(path), "-o",
                                    str(tmp_path / "out"), "--no-compilation-cache"])
    assert res.exit_code == 1 and "records none: pass model=" in res.output
    assert len(res.output.strip().splitlines()) == 1


# --- models by name or folder, loaded once -----------------------------------------------------------------------


def test_model_cache_returns_the_same_object(model_dir, monkeypatch):
    loads = []
    original = hub.load_model
    monkeypatch.setattr(hub, "load_model", lambda *a, **kw: loads.append(a) or original(*a, **kw))
    hub.clear_model_cache()
    first = resolve_model(str(model_dir))
    assert resolve_model(model_dir) is first and resolve_model(str(model_dir) + "/") is first
    assert len(loads) == 1
    assert hub.model_source(first) == str(model_dir.resolve())
    assert resolve_model(first) is first
    # a rewritten folder is read again
    save_model(tiny_vit(CONFIG, seed=3), model_dir)
    second = resolve_model(model_dir)
    assert second is not first and len(loads) == 2
    save_model(tiny_vit(CONFIG), model_dir)  # as the module's other tests expect it


def test_segment_with_a_folder_loads_it_once(model_dir, image, concepts, monkeypatch):
    loads = []
    original = hub.load_model
    monkeypatch.setattr(hub, "load_model", lambda *a, **kw: loads.append(a) or original(*a, **kw))
    hub.clear_model_cache()
    for _ in range(3):
        labels = segment(image, concepts, model=str(model_dir))
    assert len(loads) == 1
    np.testing.assert_array_equal(labels, segment(image, concepts, model=load_model(model_dir)))


def test_model_as_a_preset_name_through_the_hub_cache(image, tmp_path, monkeypatch):
    from test_hub import fake_hub_cache, use_hf_home
    from timm_models import fseg_config, make_timm_model, save_hub_files

    hub_cache = use_hf_home(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(hub, "config_from_preset", lambda name: fseg_config(name, depth=1))
    files = save_hub_files(make_timm_model("h0_mini", depth=1), tmp_path / "src")
    fake_hub_cache(hub_cache, "h0_mini", files["bin"])  # the file the hub ships

    c = np.abs(np.random.default_rng(0).standard_normal((4, 768))).astype(np.float32)
    expected = segment(image, c, model=load_model("h0_mini"))
    np.testing.assert_array_equal(segment(image, c, model="h0_mini"), expected)
    # a bank that records the preset needs no model at all
    np.testing.assert_array_equal(segment(image, ConceptBank({4: c}, model="h0_mini", layer=-1)), expected)
    _, params = make_token_fn("h0_mini", c)
    assert params["concepts"].shape == (4, 768)


# --- one pipeline ------------------------------------------------------------------------------------------------


def test_one_frozen_pipeline_behind_segment_and_make_token_fn(model_dir, image, concepts):
    model = load_model(model_dir)
    pipeline = Pipeline.create(concepts, model=model, method="nearest")
    assert (pipeline.k, pipeline.layers, pipeline.method, pipeline.feature_dim) == (5, (-1,), "nearest", D)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pipeline.k = 3
    with pytest.raises(ValueError):
        pipeline.concepts[0, 0] = 1.0  # read-only
    np.testing.assert_array_equal(pipeline.segment(image), segment(image, concepts, model=model, method="nearest"))
    fn, params = pipeline.token_fn()
    fn2, params2 = make_token_fn(model, concepts, method="nearest")
    batch = jnp.asarray(image[None])
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(params, batch)), np.asarray(jax.jit(fn2)(params2, batch)))
    # the constructor checks what it is given, as create does
    with pytest.raises(ValueError, match="concept dimension 7"):
        Pipeline(model, np.ones((3, 7), np.float32))
    with pytest.raises(ValueError, match="solver 'admm' does not apply to method 'factorize'"):
        Pipeline(model, concepts, method="factorize", solver="admm")


def test_inputs_are_not_modified(model_dir, image, concepts):
    c = concepts.copy()
    c[0, :3] = -0.25
    before, image_before = c.copy(), image.copy()
    with pytest.warns(UserWarning, match="clipped to 0 in a copy"):
        pipeline = Pipeline.create(c, model=str(model_dir))
    pipeline.segment(image)
    np.testing.assert_array_equal(c, before)
    np.testing.assert_array_equal(image, image_before)
    assert (pipeline.concepts >= 0).all() and pipeline.concepts[0, 0] == 0


# --- one concept check -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty", "zero_row"])
def test_empty_and_all_zero_concepts_are_refused_everywhere_alike(model_dir, image, concepts, case, tmp_path):
    bad = np.zeros((0, D), np.float32) if case == "empty" else concepts.copy()
    if case == "zero_row":
        bad[2] = 0
    x = np.abs(np.random.default_rng(2).standard_normal((10, D))).astype(np.float32)
    with pytest.raises(ValueError) as from_project:
        project(x, bad)
    message = str(from_project.value)
    assert ("empty" if case == "empty" else "rows [2] are all zero") in message
    with pytest.raises(ValueError) as from_segment:
        segment(image, bad, model=str(model_dir))
    assert str(from_segment.value) == message
    with pytest.raises(ValueError) as from_token_fn:
        make_token_fn(str(model_dir), bad)
    assert str(from_token_fn.value) == message
    if case == "zero_row":  # a bank file can hold such a row; the command line refuses it with the same sentence
        path = save_concepts(tmp_path / "bank.safetensors", ConceptBank({5: bad}, model=str(model_dir)))
        _save_png(image, tmp_path / "img.png")
        res = CliRunner().invoke(main, ["segment", str(tmp_path / "img.png"), "--concepts", str(path), "-o",
                                        str(tmp_path / "out"), "--no-compilation-cache"])
        assert res.exit_code == 1 and message in res.output


# --- one NMF start -----------------------------------------------------------------------------------------------


def test_factorize_and_segment_dff_give_the_same_components(model_dir, image):
    model = load_model(model_dir)
    feats = token_features(model, preprocess(jnp.asarray(image[None]), model.config))[0]  # (6, 10, D)
    x_dn = np.asarray(feats).reshape(-1, D).T  # channels x tokens, the matrix the original factorises
    for seed in (0, 7):
        ours = segment(image, model=model, method="dff", k=3, seed=seed)
        ref = factorize(x_dn, 3, seed=seed)
        np.testing.assert_allclose(ours.components, np.asarray(ref.w).T, rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(ours.weights, np.asarray(ref.h).T.reshape(6, 10, 3), rtol=1e-3, atol=1e-5)
    other = segment(image, model=model, method="dff", k=3, seed=1)
    assert not np.allclose(other.components, ours.components)


@pytest.mark.filterwarnings("ignore:Maximum number of iterations")
def test_the_nmf_start_is_scikit_learns():
    """One coordinate-descent sweep of scikit-learn's NMF from its own random start and from ours ends in the same
    factors: to float32 rounding (the start's scale is rounded differently, and the sweep carries that to about 1e-6
    of the largest entries), where another start ends far away."""
    from sklearn.decomposition import NMF

    x = np.abs(np.random.default_rng(0).standard_normal((40, 12))).astype(np.float32)
    w0, h0 = random_init(jnp.asarray(x), 5, 3)
    common = {"n_components": 5, "solver": "cd", "tol": 0.0, "max_iter": 1}
    reference = NMF(init="random", random_state=3, **common)
    w_ref = reference.fit_transform(x)
    ours = NMF(init="custom", **common)
    w = ours.fit_transform(x, W=np.array(w0), H=np.array(h0))
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-5 * w_ref.max())
    np.testing.assert_allclose(ours.components_, reference.components_, rtol=1e-5,
                               atol=1e-5 * reference.components_.max())
