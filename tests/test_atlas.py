"""The concept atlas keeps, image by image, exactly the strongest tokens a look at every image at once finds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_config, tiny_vit

import fseg_jax
from fseg_jax.atlas import concept_atlas, save_atlas


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    model = tiny_vit()
    bank = rng.uniform(0, 1, (5, 32)).astype(np.float32)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in [(40, 56, 3), (24, 32, 3), (48, 40, 3)]]
    return model, bank, images


def test_streamed_atlas_equals_the_top_tokens_over_all_images(setup):
    model, bank, images = setup
    n = 4
    atlas = concept_atlas(iter(images), bank, model=model, n=n, patch=16)  # a one-pass iterator is enough
    weights = [fseg_jax.segment(im, bank, model=model, return_weights=True).weights for im in images]
    every = [(float(w[y, x, c]), i, y, x, c) for i, w in enumerate(weights)
             for y in range(w.shape[0]) for x in range(w.shape[1]) for c in range(w.shape[2])]
    checked = 0
    for c in range(bank.shape[0]):
        ranked = sorted((e for e in every if e[4] == c and e[0] > 0), key=lambda e: -e[0])[:n]
        np.testing.assert_allclose(atlas.weights[c, : len(ranked)], [e[0] for e in ranked], rtol=1e-6)
        assert [tuple(s) for s in atlas.sources[c, : len(ranked)]] == [e[1:4] for e in ranked]
        for slot, (_, i, y, x, _) in enumerate(ranked):
            top, left = 8 * y - 4, 8 * x - 4  # a 16 px crop centred on the token's centre (8y + 4, 8x + 4)
            height, width = images[i].shape[:2]
            if top >= 0 and left >= 0 and top + 16 <= height and left + 16 <= width:
                np.testing.assert_array_equal(atlas.patches[c, slot], images[i][top : top + 16, left : left + 16])
                checked += 1
    assert checked > 0
    flat = np.concatenate([w.reshape(-1, w.shape[-1]) for w in weights])
    assert atlas.tokens == flat.shape[0]
    np.testing.assert_allclose(atlas.share, np.bincount(flat.argmax(1), minlength=5) / flat.shape[0])
    np.testing.assert_allclose(atlas.mean_weight, flat.mean(0), rtol=1e-5)
    assert atlas.share.sum() == pytest.approx(1.0)


def test_crops_beyond_the_image_are_white(setup):
    model, bank, images = setup
    atlas = concept_atlas(images[:1], bank, model=model, n=40, patch=24)
    corner = [(c, j) for c in range(5) for j in range(40) if tuple(atlas.sources[c, j][1:]) == (0, 0)]
    assert corner, "the top-left token is among the 40 strongest of some concept"
    c, j = corner[0]
    assert (atlas.patches[c, j, :8] == 255).all() and (atlas.patches[c, j, :, :8] == 255).all()
    np.testing.assert_array_equal(atlas.patches[c, j, 8:, 8:], images[0][:16, :16])


def test_save_writes_the_picture_and_its_numbers(setup, tmp_path):
    model, bank, images = setup
    atlas = concept_atlas(images, bank, model=model, n=3, patch=16)
    png, numbers = save_atlas(tmp_path / "atlas.png", atlas)
    picture = np.asarray(Image.open(png))
    assert picture.shape == (5 * 18 + 2, 40 + 3 * 18 + 2, 3)
    summary = json.loads(numbers.read_text())
    assert [c["index"] for c in summary["concepts"]] == list(range(5))
    assert summary["tokens"] == atlas.tokens
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.json", "atlas.png"]  # no temporaries left
    with pytest.raises(ValueError, match="images: empty list"):
        concept_atlas([], bank, model=model)
    with pytest.raises(ValueError, match="no images"):
        concept_atlas(iter([]), bank, model=model)
    with pytest.raises(ValueError, match="n and patch must be positive"):
        concept_atlas(images, bank, model=model, n=0)


def test_cli_writes_the_atlas_of_a_folder(setup, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    model, bank, images = setup
    model_dir = save_model(model, tmp_path / "model")
    bank_path = save_concepts(tmp_path / "bank.safetensors", ConceptBank({5: bank}, model=str(model_dir), layer=-1))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")
    run = CliRunner().invoke(main, ["concepts", "atlas", str(folder), "--concepts", str(bank_path), "--n", "2",
                                    "--patch", "16", "-o", str(tmp_path / "atlas.png")])
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "atlas.json").read_text())
    assert len(summary["concepts"]) == 5 and summary["tokens"] == sum(-(-h // 8) * -(-w // 8) for h, w, _ in
                                                                     (im.shape for im in images))
    run = CliRunner().invoke(main, ["concepts", "atlas", "--concepts", str(bank_path), "-o", str(tmp_path / "x.png")])
    assert run.exit_code != 0 and "give IMAGE" in run.output


def test_slide_atlas_equals_the_top_tissue_tokens_of_the_slide_pipeline(tmp_path):
    """A slide's atlas streams tissue tiles with the slide pipeline's tiling and tissue rule, so its top tokens
    are the top tokens of the token weights `segment_slide` saves (background tokens count for neither)."""
    from safetensors.numpy import load_file
    from test_wsi import synthetic_he, write_ome_tiff
    from test_wsi_model import uni_tiny_config

    from fseg_jax.wsi import open_slide, segment_slide

    model = tiny_vit(uni_tiny_config())
    bank = np.abs(np.random.default_rng(1).normal(size=(5, 64))).astype(np.float32)
    image, _ = synthetic_he(600, 800, seed=3)
    slide = write_ome_tiff(tmp_path / "s.ome.tif", image, mpp=0.5, levels=2)
    settings = {"mpp": 1.0, "tile": 256}  # the default margin, 16 px, as in segment_slide
    segment_slide(slide, tmp_path / "out", model=model, concepts=bank, save_weights=True, **settings)
    saved = load_file(tmp_path / "out" / "weights.safetensors")
    tissue = saved["labels"] > 0
    assert 0 < tissue.sum() < tissue.size

    atlas = concept_atlas([image[:64, :64], slide], bank, model=model, n=3, patch=32, **settings)
    ys, xs = np.nonzero(tissue)
    flat = saved["weights"][ys, xs]
    own = np.asarray(fseg_jax.segment(image[:64, :64], bank, model=model, return_weights=True).weights)
    assert atlas.tokens == len(ys) + own.shape[0] * own.shape[1]
    slide_wins = atlas.share * atlas.tokens - np.bincount(own.reshape(-1, 5).argmax(1), minlength=5)
    np.testing.assert_allclose(slide_wins, np.bincount(flat.argmax(1), minlength=5), atol=1e-6)
    with open_slide(slide) as reader:
        plan = reader.plan(1.0)
        for c in range(5):
            from_slide = [j for j in range(3) if atlas.sources[c, j, 0] == 1]
            expected = np.argsort(-flat[:, c], kind="stable")[: len(from_slide)]
            np.testing.assert_allclose(atlas.weights[c, from_slide], flat[expected, c], rtol=1e-4)
            assert [tuple(atlas.sources[c, j, 1:]) for j in from_slide] == list(zip(ys[expected], xs[expected]))
            for j in from_slide:  # crops come from the slide itself, centred on the token
                y, x = atlas.sources[c, j, 1:]
                np.testing.assert_array_equal(atlas.patches[c, j], reader.read(plan, 16 * x - 8, 16 * y - 8, 32, 32))
    numbers = atlas.summary()
    assert [i["kind"] for i in numbers["inputs"]] == ["image", "slide"]
    entry = next(p for c in numbers["concepts"] for p in c["patches"] if p["image"] == 1)
    assert entry["level0_xy"] == [(entry["token"][1] + 0.5) * 32, (entry["token"][0] + 0.5) * 32]  # 16 px at 1 um = 32 at 0.5


def test_cli_atlas_of_a_folder_of_slides(tmp_path):
    from click.testing import CliRunner
    from test_wsi import synthetic_he, write_ome_tiff
    from test_wsi_model import uni_tiny_config

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    model_dir = save_model(tiny_vit(uni_tiny_config()), tmp_path / "model")
    bank = np.abs(np.random.default_rng(1).normal(size=(4, 64))).astype(np.float32)
    bank_path = save_concepts(tmp_path / "bank.safetensors", ConceptBank({4: bank}, model=str(model_dir), layer=-1))
    (tmp_path / "slides").mkdir()
    write_ome_tiff(tmp_path / "slides" / "a.ome.tif", synthetic_he(400, 600, seed=5)[0], mpp=0.5, levels=2)
    run = CliRunner().invoke(main, ["concepts", "atlas", str(tmp_path / "slides"), "--concepts", str(bank_path),
                                    "--mpp", "1", "--tile", "128", "--n", "2", "-o", str(tmp_path / "atlas.png")])
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "atlas.json").read_text())
    assert summary["inputs"][0]["kind"] == "slide" and summary["inputs"][0]["width"] == 300
    assert 0 < summary["tokens"] < 19 * 13  # tissue tokens only, of the 300 x 200 px slide's 19 x 13 tokens
    assert Image.open(tmp_path / "atlas.png").size[1] > 4 * 64


def test_named_bank_rows_show_class_names_and_colours(setup):
    from fseg_jax.concepts import ConceptBank
    from fseg_jax.visualize import palette

    model, bank, images = setup
    named = ConceptBank({5: bank}, model=None, layer=-1).with_names(5, {0: "tumour", 2: "tumour"}, {2: "#d62728"})
    atlas = concept_atlas(images, named, model=model, n=2, patch=16)
    assert [c.get("class") for c in atlas.summary()["concepts"]] == ["tumour", "concept 1", "tumour", "concept 3",
                                                                      "concept 4"]
    picture = atlas.picture()
    row_colour = [tuple(picture[2 + c * 18 + 12, 4]) for c in range(5)]  # inside each row's colour box
    assert row_colour[0] == row_colour[2] == (214, 39, 40)
    assert row_colour[1] == tuple(palette(5)[1]) and row_colour[3] == tuple(palette(5)[3])
    plain = concept_atlas(images, bank, model=model, n=2, patch=16)
    assert plain.classes is None and "class" not in plain.summary()["concepts"][0]


def test_slide_atlas_at_patch_14_by_default_and_a_given_slide_stays_open(tmp_path):
    from test_wsi import synthetic_he, write_ome_tiff

    from fseg_jax.wsi import open_slide

    model = tiny_vit(tiny_config(patch_size=14))
    bank = np.abs(np.random.default_rng(2).normal(size=(3, 32))).astype(np.float32)
    path = write_ome_tiff(tmp_path / "s.ome.tif", synthetic_he(600, 800, seed=4)[0], mpp=0.5, levels=2)
    with open_slide(path) as slide:
        atlas = concept_atlas([slide], bank, model=model, n=2, patch=28, mpp=0.5)  # 504 px tiles: whole patches
        assert atlas.tokens > 0 and atlas.inputs[0]["kind"] == "slide"
        assert slide.read_level(0, 0, 0, 4, 4).shape == (4, 4, 3)  # the caller's slide is not closed
