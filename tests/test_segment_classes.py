"""segment(classes=True) and fseg-jax segment with a named bank: class labels, overlays, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import tiny_config, tiny_vit

from fseg_jax.cli import main
from fseg_jax.concepts import ConceptBank, save_concepts
from fseg_jax.hub import save_model
from fseg_jax.segmentation import Pipeline, segment
from fseg_jax.visualize import overlay

D = 32
NAMES = {1: "tumour", 2: "stroma", 5: "stroma", 6: "fat"}


@pytest.fixture(scope="module")
def model():
    return tiny_vit(tiny_config(patch_size=16, embed_dim=D, depth=2, num_heads=2, reg_tokens=0))


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(1)
    plain = ConceptBank({k: np.abs(rng.standard_normal((k, D))) for k in (4, 8)}, model="tiny", layer=-1)
    return plain.with_names(8, NAMES, {6: "#ffff00"})


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8), rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)]


def test_class_labels_are_the_concept_labels_mapped_by_name(model, bank):
    images = _images()
    kept = [im.copy() for im in images]
    concept_labels = segment(images, bank, model=model, k=8)
    class_labels = segment(images, bank, model=model, k=8, classes=True)
    # by hand: concept -> class in the order of each class's first concept
    names = ["concept 0", "tumour", "stroma", "concept 3", "concept 4", "fat", "concept 7"]
    by_hand = {c: names.index(NAMES.get(c, f"concept {c}")) for c in range(8)}
    assert bank.classes(8).names == tuple(names)
    for concepts_hw, classes_hw in zip(concept_labels, class_labels):
        assert classes_hw.dtype == np.int32 and classes_hw.shape == concepts_hw.shape
        np.testing.assert_array_equal(classes_hw, np.vectorize(by_hand.get)(concepts_hw))
    assert len(np.unique(np.concatenate([c.ravel() for c in concept_labels]))) > 2  # the mapping is exercised
    for im, before in zip(images, kept):
        np.testing.assert_array_equal(im, before)
    # weights stay per concept
    result = segment(images[0], bank, model=model, k=8, classes=True, return_weights=True)
    np.testing.assert_array_equal(result.labels, class_labels[0])
    assert result.weights.shape[-1] == 8
    # a pipeline carries the classes of its k only
    assert Pipeline.create(bank, model=model, k=8).classes.names == tuple(names)
    assert Pipeline.create(bank, model=model, k=4).classes is None


@pytest.mark.parametrize(
    "concepts, k, method, message",
    [
        ("bank", 4, "project", r"these k=4 concepts have none"),
        ("array", None, "project", r"these k=8 concepts have none"),
        (None, 3, "dff", "method 'dff' labels NMF components"),
    ],
)
def test_classes_without_names_is_one_clear_error(model, bank, concepts, k, method, message):
    given = {"bank": bank, "array": bank[8], None: None}[concepts]
    with pytest.raises(ValueError, match=message):
        segment(_images()[0], given, model=model, k=k, method=method, classes=True)


def test_pipeline_checks_its_classes(model, bank):
    with pytest.raises(ValueError, match="ConceptClasses of the k=4 concepts"):
        Pipeline(model=model, concepts=bank[4], classes=bank.classes(8))


# --- the command line -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory, model, bank):
    root = tmp_path_factory.mktemp("segment_classes")
    save_model(model, root / "model")
    save_concepts(root / "bank.safetensors", bank)
    for name, image in zip("ab", _images()):
        Image.fromarray(image).save(root / f"{name}.png")
    return root


def _invoke(assets, out, *extra):
    args = [assets / "a.png", "--model", assets / "model", "--concepts", assets / "bank.safetensors",
            "-o", out, "--no-compilation-cache", *extra]
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def test_cli_overlay_shows_classes_and_classes_option_writes_class_labels(assets, model, bank, tmp_path):
    res = _invoke(assets, tmp_path / "concepts", "--k", 8)
    assert res.exit_code == 0, res.output
    concept_labels = np.load(tmp_path / "concepts" / "a_labels.npy")
    np.testing.assert_array_equal(concept_labels, segment(_images()[0], bank, model=model, k=8))
    image = np.asarray(Image.open(assets / "a.png"))
    expected = overlay(image, concept_labels, legend=True, classes=bank.classes(8))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "concepts" / "a_overlay.png")), expected)

    res = _invoke(assets, tmp_path / "classes", "--k", 8, "--classes")
    assert res.exit_code == 0, res.output
    class_labels = np.load(tmp_path / "classes" / "a_labels.npy")
    np.testing.assert_array_equal(class_labels, bank.classes(8).map(concept_labels))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "classes" / "a_labels.png")), class_labels)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "classes" / "a_overlay.png")), expected)

    # k=4 has no names: the outputs are those of an unnamed bank
    res = _invoke(assets, tmp_path / "plain", "--k", 4)
    assert res.exit_code == 0, res.output
    labels = np.load(tmp_path / "plain" / "a_labels.npy")
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "plain" / "a_overlay.png")), overlay(image, labels, legend=True)
    )


def test_cli_classes_with_an_unnamed_k_is_one_line(assets, tmp_path):
    res = _invoke(assets, tmp_path / "x", "--k", 4, "--classes")
    assert res.exit_code == 1 and res.output.count("\n") == 1
    assert res.output.startswith("Error: --classes needs a bank whose concepts are named") and "k=4" in res.output
    assert not (tmp_path / "x").exists()
