"""One colour per concept (and per class of a named bank) in every output, background apart.

A slide and its own pixels segmented as an image: concept i has one RGB in ``fseg_jax.overlay`` (and so in
``fseg-jax segment``'s overlay), the atlas, the slide's overlay, GeoJSON, summary.json and the viewer's legend.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_wsi import synthetic_he, write_ome_tiff
from test_wsi_model import uni_tiny_config
from tiny_models import tiny_vit

K = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fseg_jax.concepts import ConceptBank

    folder = tmp_path_factory.mktemp("colours")
    image, _ = synthetic_he(256, 320, seed=11)
    slide = write_ome_tiff(folder / "s.ome.tif", image, mpp=1.0, levels=1)
    model = tiny_vit(uni_tiny_config())
    bank = ConceptBank({K: np.abs(np.random.default_rng(3).normal(size=(K, 64))).astype(np.float32)}, model=None)
    return folder, image, slide, model, bank


def _slide_colours(out):
    """{label name: RGB} from the GeoJSON, the summary and the viewer's legend of a finished slide run."""
    from fseg_jax.viewer.build import legend_entries

    features = json.loads((out / "labels.geojson").read_text())["features"]
    geojson = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
               for f in features}
    summary = json.loads((out / "summary.json").read_text())
    entries = summary["classes"] if "classes" in summary else summary["concepts"]
    in_summary = {e["name"]: tuple(e["color"]) for e in entries}
    _, legend = legend_entries(summary)
    in_legend = {e["name"]: tuple(e["color"]) for e in legend}
    return geojson, in_summary, in_legend


def test_concept_i_has_one_colour_in_every_output(run):
    import fseg_jax
    from fseg_jax.atlas import concept_atlas
    from fseg_jax.visualize import BACKGROUND, palette

    folder, image, slide, model, bank = run
    result = fseg_jax.segment_slide(slide, folder / "plain", bank, model=model, k=K, mpp=1.0, tile=128, margin=16,
                                    batch=4)
    geojson, in_summary, in_legend = _slide_colours(result.out_dir)
    expected = {f"concept {i}": tuple(int(c) for c in palette(K)[i]) for i in range(K)}
    assert geojson and all(geojson[name] == expected[name] for name in geojson)
    assert in_summary == in_legend == expected
    assert BACKGROUND not in expected.values()

    labels = fseg_jax.segment(image, bank, model=model, k=K)
    drawn = fseg_jax.overlay(image, labels, alpha=1.0)
    for i in np.unique(labels):
        assert {tuple(c) for c in drawn[labels == i]} == {expected[f"concept {i}"]}

    atlas = concept_atlas([image], bank, model=model, k=K, n=1, patch=16).picture()
    row_colours = [tuple(atlas[2 + c * 18 + 12, 4]) for c in range(K)]  # inside each row's colour box
    assert row_colours == [expected[f"concept {i}"] for i in range(K)]


def test_a_class_of_a_named_bank_has_one_colour_in_every_output(run):
    import fseg_jax

    folder, image, slide, model, bank = run
    named = bank.with_names(K, {0: "tumour", 3: "tumour", 1: "stroma"}, {1: "#123456"})
    classes = named.classes(K)
    result = fseg_jax.segment_slide(slide, folder / "named", named, model=model, mpp=1.0, tile=128, margin=16,
                                    batch=4)
    geojson, in_summary, in_legend = _slide_colours(result.out_dir)
    from fseg_jax.visualize import palette

    expected = {name: tuple(int(c) for c in rgb) for name, rgb in zip(classes.names, classes.rgb(palette(K)))}
    assert expected["stroma"] == (0x12, 0x34, 0x56) and expected["tumour"] == tuple(palette(K)[0])
    assert geojson and all(geojson[name] == expected[name] for name in geojson)
    assert in_summary == in_legend == expected

    labels = fseg_jax.segment(image, named, model=model)
    drawn = fseg_jax.overlay(image, labels, alpha=1.0, classes=classes)
    for i in np.unique(labels):
        assert {tuple(c) for c in drawn[labels == i]} == {expected[classes.names[classes.map(np.array([i]))[0]]]}
