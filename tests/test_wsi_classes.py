"""Slides with a named bank: classes in labels.ome.tif, labels.geojson, overlay.png and summary.json.

The runs use test_wsi's local stand-in token function (k = 4), so the class outputs can be checked against
the concept outputs of the same slide, mapped by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_wsi import PATCH, K, standin_token_fn, synthetic_he, write_ome_tiff

from fseg_jax.concepts import ConceptClasses
from fseg_jax.visualize import palette
from fseg_jax.wsi import pipeline
from fseg_jax.wsi.outputs import label_names
from fseg_jax.wsi.store import WorkDir

CLASSES = ConceptClasses.from_names(K, {0: "stroma", 3: "stroma", 1: "nuclei"}, {1: "#123456"})
# concept label (i + 1) -> class label (j + 1): stroma = concepts 0 and 3, nuclei = 1, "concept 2" = 2
BY_HAND = np.array([0, 1, 2, 3, 1])


def _segmenter(classes=None, **kwargs):
    fn, params = standin_token_fn()
    return pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=2, mpp=1.0, classes=classes, **kwargs
    )


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    image, _ = synthetic_he(600, 800, seed=1)
    return write_ome_tiff(tmp_path_factory.mktemp("slide") / "tissue.ome.tif", image, mpp=0.5)


@pytest.fixture(scope="module")
def runs(slide, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    concepts = _segmenter().run(slide, root / "concepts")
    classes = _segmenter(CLASSES).run(slide, root / "classes")
    return concepts, classes


def _labels(result) -> np.ndarray:
    import tifffile

    return tifffile.imread(result.out_dir / "labels.ome.tif")


def test_label_map_holds_classes_named_in_the_ome_xml(runs):
    concepts, classes = runs
    concept_labels, class_labels = _labels(concepts), _labels(classes)
    assert set(np.unique(concept_labels)) == {0, 1, 2, 4}  # concepts 0, 1 and 3: two of them merge as stroma
    np.testing.assert_array_equal(class_labels, BY_HAND[concept_labels])
    assert label_names(classes.out_dir / "labels.ome.tif") == {0: "background", 1: "stroma", 2: "nuclei",
                                                               3: "concept 2"}
    unnamed = {0: "background", **{i + 1: f"concept {i}" for i in range(K)}}
    assert label_names(concepts.out_dir / "labels.ome.tif") == unnamed


def test_summary_areas_per_class_are_the_sums_of_their_concepts(runs):
    concepts, classes = runs
    summary = json.loads((classes.out_dir / "summary.json").read_text())
    assert summary == classes.summary
    stroma, nuclei, other = summary["classes"]
    assert set(stroma) == {"label", "name", "color", "concepts", "area_mm2", "share_of_tissue"}
    assert [(c["label"], c["name"], c["concepts"]) for c in summary["classes"]] == [
        (1, "stroma", [0, 3]), (2, "nuclei", [1]), (3, "concept 2", [2])
    ]
    # colours: given, else the slide colour of the class's first concept (concept i is palette(k)[i], as in every output)
    assert nuclei["color"] == [0x12, 0x34, 0x56] and stroma["color"] == palette(K)[0].tolist()
    assert other["color"] == palette(K)[2].tolist() and other["area_mm2"] == 0.0  # concept 2 is absent
    by_concept = {c["concept"]: c for c in summary["concepts"]}
    unnamed = {c["concept"]: c for c in concepts.summary["concepts"]}
    for entry in summary["classes"]:
        members = [by_concept[i] for i in entry["concepts"]]
        assert entry["area_mm2"] == pytest.approx(sum(m["area_mm2"] for m in members), rel=1e-12)
        assert entry["area_mm2"] == pytest.approx(sum(unnamed[i]["area_mm2"] for i in entry["concepts"]), rel=1e-12)
        assert entry["share_of_tissue"] == pytest.approx(sum(m["share_of_tissue"] for m in members), rel=1e-12)
        for m in members:  # each concept: the label and colour of its class
            assert (m["class"], m["label"], m["color"]) == (entry["name"], entry["label"], entry["color"])
    counts = np.bincount(_labels(classes).ravel(), minlength=4)
    assert [c["area_mm2"] for c in summary["classes"]] == pytest.approx(counts[1:] * 1e-6)
    assert sum(c["share_of_tissue"] for c in summary["classes"]) == pytest.approx(1.0)
    assert summary["labels"] == {"0": "background", "1": "stroma", "2": "nuclei", "3": "concept 2"}
    assert summary["tissue_area_mm2"] == concepts.summary["tissue_area_mm2"]


def test_geojson_has_one_qupath_classification_per_class(runs):
    import shapely

    _, classes = runs
    summary = classes.summary
    doc = json.loads((classes.out_dir / "labels.geojson").read_text())
    counts = np.bincount(_labels(classes).ravel(), minlength=4)
    assert [f["properties"]["label"] for f in doc["features"]] == [1, 2]  # the absent class has no feature
    for feature, entry in zip(doc["features"], summary["classes"]):
        props = feature["properties"]
        assert props["classification"] == {"name": entry["name"], "color": entry["color"]}
        assert props["name"] == entry["name"]
        geom = shapely.geometry.shape(feature["geometry"])
        assert shapely.is_valid(geom) and geom.area == pytest.approx(counts[entry["label"]] * 2 * 2, rel=0.02)


def test_overlay_draws_classes(runs):
    from PIL import Image

    concepts, classes = runs
    picture = np.asarray(Image.open(classes.out_dir / "overlay.png"))
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert (0x12, 0x34, 0x56) in colours  # the nuclei swatch of the legend, in its given colour
    assert tuple(palette(K)[3]) not in colours  # concept 3 is drawn as stroma, in concept 0's colour
    unnamed = np.asarray(Image.open(concepts.out_dir / "overlay.png"))
    assert tuple(palette(K)[3]) in {tuple(c) for c in unnamed.reshape(-1, 3)}


def test_a_run_without_names_writes_concepts_as_before(runs):
    concepts, _ = runs
    summary = concepts.summary
    assert "classes" not in summary and "classes" not in _segmenter().settings()
    fields = {"label", "concept", "name", "color", "area_mm2", "share_of_tissue"}
    assert all(set(c) == fields for c in summary["concepts"])
    assert [c["label"] for c in summary["concepts"]] == [1, 2, 3, 4]
    doc = json.loads((concepts.out_dir / "labels.geojson").read_text())
    names = [f["properties"]["classification"]["name"] for f in doc["features"]]
    assert names == ["concept 0", "concept 1", "concept 3"]


def test_names_enter_the_fingerprint_and_other_names_merge_the_finished_batches(slide, runs, tmp_path, monkeypatch):
    concepts, classes = runs
    assert classes.summary["fingerprint"] != concepts.summary["fingerprint"]
    again = _segmenter(CLASSES).run(slide, classes.out_dir)
    assert again.tiles_computed == 0 and again.summary == classes.summary and not again.merged
    assert classes.merged and concepts.merged

    # killed before its outputs, without names: a run with names resumes from the finished batches
    out = tmp_path / "killed"
    real_merge = pipeline.merge_slide

    def killed(out_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "merge_slide", killed)
    with pytest.raises(KeyboardInterrupt):
        _segmenter().run(slide, out)
    monkeypatch.setattr(pipeline, "merge_slide", real_merge)
    plan = WorkDir(out).read_plan()
    assert "classes" not in plan and len(WorkDir(out).done(plan["fingerprint"])) == len(plan["batches"])
    resumed = _segmenter(CLASSES).run(slide, out)
    assert resumed.tiles_computed == 0 and resumed.tiles == classes.tiles
    np.testing.assert_array_equal(_labels(resumed), _labels(classes))
    assert resumed.summary["classes"] == classes.summary["classes"]
    assert resumed.summary["fingerprint"] == classes.summary["fingerprint"]

    # a finished run with other names: new outputs with the new names
    renamed = ConceptClasses.from_names(K, {0: "pink", 1: "pink", 2: "pink", 3: "glass"})
    result = _segmenter(renamed).run(slide, out)
    assert [c["name"] for c in result.summary["classes"]] == ["pink", "glass"]
    np.testing.assert_array_equal(_labels(result), np.array([0, 1, 1, 1, 2])[_labels(concepts)])
    assert label_names(out / "labels.ome.tif") == {0: "background", 1: "pink", 2: "glass"}


def test_multi_process_runs_must_agree_on_names(slide, runs, tmp_path):
    import tifffile

    out = tmp_path / "parts"
    _segmenter(CLASSES).run(slide, out, part=(0, 2))
    with pytest.raises(pipeline.SlideRunMismatch, match="classes"):
        _segmenter().run(slide, out, part=(1, 2))
    _segmenter(CLASSES).run(slide, out, part=(1, 2))
    summary = pipeline.merge_slide(out)
    assert summary["classes"] == runs[1].summary["classes"]
    np.testing.assert_array_equal(tifffile.imread(out / "labels.ome.tif"), _labels(runs[1]))


def test_classes_must_fit_k():
    with pytest.raises(ValueError, match="ConceptClasses of the k=4 concepts"):
        _segmenter(ConceptClasses.from_names(3, {0: "a"}))


def test_from_model_takes_the_classes_of_a_named_bank():
    from tiny_models import tiny_config, tiny_vit

    from fseg_jax.concepts import ConceptBank

    model = tiny_vit(tiny_config(patch_size=16, embed_dim=32, depth=1, num_heads=2, reg_tokens=0))
    rng = np.random.default_rng(0)
    bank = ConceptBank({3: rng.random((3, 32)), 4: rng.random((4, 32))}).with_names(4, {1: "a", 3: "a"})
    named = pipeline.SlideSegmenter.from_model(model, bank, k=4, tile=64, margin=16)
    assert named.classes.names == ("concept 0", "a", "concept 2")
    assert named.settings()["classes"]["concepts"] == [[0], [1, 3], [2]]
    assert pipeline.SlideSegmenter.from_model(model, bank, k=3, tile=64, margin=16).classes is None


def test_cli_slide_with_a_named_bank_on_a_real_slide(shared_data, tmp_path):
    """fseg-jax slide on the CMU SVS with a tiny random UNI-shaped model: the bank file's names reach the
    outputs, which are the unnamed run's concepts mapped to classes."""
    import tifffile
    from click.testing import CliRunner
    from test_wsi_model import uni_tiny_config
    from tiny_models import tiny_vit

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    save_model(tiny_vit(uni_tiny_config()), tmp_path / "model")
    rng = np.random.default_rng(0)
    plain = ConceptBank({5: np.abs(rng.normal(size=(5, 64)))}, model=str(tmp_path / "model"), layer=-1)
    save_concepts(tmp_path / "plain.safetensors", plain)
    save_concepts(tmp_path / "named.safetensors", plain.with_names(5, {0: "tumour", 2: "stroma", 4: "stroma"}))
    outs = {}
    for bank in ("plain", "named"):
        args = ["slide", str(shared_data / "he" / "cmu_small_region.svs"), "--model", str(tmp_path / "model"),
                "--concepts", str(tmp_path / f"{bank}.safetensors"), "--mpp", "4", "--tile", "128", "--margin",
                "16", "--batch", "4", "--no-compilation-cache", "-o", str(tmp_path / bank)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outs[bank] = tmp_path / bank / "cmu_small_region"
    plain_labels = tifffile.imread(outs["plain"] / "labels.ome.tif")
    named_labels = tifffile.imread(outs["named"] / "labels.ome.tif")
    assert {3, 5} <= set(np.unique(plain_labels).tolist())  # concepts 2 and 4 are both there to merge
    # classes: tumour (0), concept 1, stroma (2, 4), concept 3
    np.testing.assert_array_equal(named_labels, np.array([0, 1, 2, 3, 4, 3])[plain_labels])
    assert label_names(outs["named"] / "labels.ome.tif") == {0: "background", 1: "tumour", 2: "concept 1",
                                                             3: "stroma", 4: "concept 3"}
    summary = json.loads((outs["named"] / "summary.json").read_text())
    plain_summary = json.loads((outs["plain"] / "summary.json").read_text())
    stroma = summary["classes"][2]
    assert (stroma["name"], stroma["concepts"]) == ("stroma", [2, 4])
    assert stroma["area_mm2"] == pytest.approx(sum(plain_summary["concepts"][i]["area_mm2"] for i in (2, 4)))
    doc = json.loads((outs["named"] / "labels.geojson").read_text())
    present = sorted({int(v) for v in np.unique(named_labels) if v > 0})
    assert [f["properties"]["label"] for f in doc["features"]] == present
    assert {f["properties"]["classification"]["name"] for f in doc["features"]} <= {
        "tumour", "concept 1", "stroma", "concept 3"}

    # the plain bank named into a new file: the plain run's outputs are written anew, no tile computed
    named = CliRunner().invoke(main, ["concepts", "name", str(tmp_path / "plain.safetensors"), "0=tumour",
                                      "2=stroma", "4=stroma", "-o", str(tmp_path / "renamed.safetensors")])
    assert named.exit_code == 0, named.output
    args[args.index("--concepts") + 1] = str(tmp_path / "renamed.safetensors")
    args[-1] = str(tmp_path / "plain")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "re-merged from earlier work" in result.output and "tiles computed" not in result.output
    np.testing.assert_array_equal(tifffile.imread(outs["plain"] / "labels.ome.tif"), named_labels)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already done" in again.output, again.output


def test_naming_after_a_finished_run_merges_its_label_map_anew(slide, runs, tmp_path, monkeypatch):
    from fseg_jax.wsi import merge

    _, classes = runs
    out = tmp_path / "named_later"
    first = _segmenter(save_weights=True).run(slide, out)
    weights = (out / "weights.safetensors").read_bytes()
    named = _segmenter(CLASSES, save_weights=True).run(slide, out)
    assert named.tiles_computed == 0 and named.merged and named.tiles == first.tiles == classes.tiles
    np.testing.assert_array_equal(_labels(named), _labels(classes))
    assert label_names(out / "labels.ome.tif") == label_names(classes.out_dir / "labels.ome.tif")
    for key in ("classes", "concepts", "labels", "tiles", "tissue_area_mm2"):
        assert named.summary[key] == classes.summary[key], key
    assert _segmenter(CLASSES, save_weights=True).run(slide, out).summary == named.summary  # finished as named
    assert (out / "labels.geojson").read_text() == (classes.out_dir / "labels.geojson").read_text()
    assert (out / "weights.safetensors").read_bytes() == weights  # the weights do not depend on the names
    assert named.summary["outputs"] == sorted([*pipeline.OUTPUT_FILES, "weights.safetensors"])
    assert named.summary["timing_s"]["compute"] == first.summary["timing_s"]["compute"]
    assert not WorkDir(out).path.exists()
    assert json.loads((out / "summary.json").read_text()) == named.summary

    # stopped while writing the classes' outputs: no finished run is left, so the next run computes
    again = tmp_path / "stopped"
    _segmenter().run(slide, again)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge, "_write_outputs", stopped)
    with pytest.raises(KeyboardInterrupt):
        _segmenter(CLASSES).run(slide, again)
    monkeypatch.undo()
    assert not (again / "summary.json").exists()
    resumed = _segmenter(CLASSES).run(slide, again)
    assert resumed.tiles_computed == resumed.tiles > 0
    np.testing.assert_array_equal(_labels(resumed), _labels(classes))


def test_the_viewer_legend_lists_the_classes(runs):
    from fseg_jax.viewer.build import legend_entries

    concepts, classes = runs
    kind, entries = legend_entries(classes.summary)
    assert kind == "Classes" and [(e["label"], e["name"]) for e in entries] == [
        (1, "stroma"), (2, "nuclei"), (3, "concept 2")]
    assert entries[1]["color"] == [0x12, 0x34, 0x56]
    assert legend_entries(concepts.summary)[0] == "Concepts"


def test_a_named_bank_object_merges_the_finished_run_of_its_unnamed_self(slide, tmp_path):
    """Through from_model with real banks: names added to the bank (its repr changes, as does the path of a
    bank saved elsewhere) change the outputs' fingerprint only; the tiles' work is the same."""
    from tiny_models import tiny_config, tiny_vit

    from fseg_jax.concepts import ConceptBank

    model = tiny_vit(tiny_config(patch_size=16, embed_dim=32, depth=1, num_heads=2, reg_tokens=0))
    plain = ConceptBank({4: np.random.default_rng(0).random((4, 32))}, layer=-1)
    named = plain.with_names(4, {0: "a", 2: "a"})
    assert repr(named) != repr(plain)
    settings = {"model": model, "k": 4, "mpp": 1.0, "tile": 64, "margin": 16, "batch": 4}
    first = pipeline.segment_slide(slide, tmp_path, concepts=plain, **settings)
    assert first.tiles_computed == first.tiles > 0 and "classes" not in first.summary

    again = pipeline.segment_slide(slide, tmp_path, concepts=named, **settings)
    assert again.tiles_computed == 0 and again.merged and again.tiles == first.tiles
    assert again.summary["bank"] == repr(named) and again.summary["fingerprint"] != first.summary["fingerprint"]
    assert again.summary["work_fingerprint"] == first.summary["work_fingerprint"]
    assert [(c["name"], c["concepts"]) for c in again.summary["classes"]] == [("a", [0, 2]), ("concept 1", [1]),
                                                                              ("concept 3", [3])]
    np.testing.assert_array_equal(_labels(again), np.array([0, 1, 2, 1, 3])[_labels(first)])
    segmenter = pipeline.SlideSegmenter.from_model(model, named, k=4, tile=64, margin=16, batch=4, mpp=1.0)
    done = segmenter.run(slide, tmp_path)
    assert done.tiles_computed == 0 and not done.merged and done.summary == again.summary


def _label_map_of_another_run(path, labels):
    """labels.ome.tif replaced by one that is not the finished run's concept map, in four ways."""
    import tifffile

    from fseg_jax.wsi.outputs import write_label_tiff
    from fseg_jax.wsi.sampling import array_sampler

    height, width = labels.shape
    names = ["background", *(f"concept {i}" for i in range(K))]

    def write(array, label_names):
        write_label_tiff(path, array_sampler(array), size=(array.shape[1], array.shape[0]), dtype=array.dtype,
                         mpp=1.0, names=label_names)

    return {
        "missing": lambda: path.unlink(),
        "size": lambda: write(labels[: height // 2], names),
        "dtype": lambda: write(labels.astype(np.uint16), names),
        "label names": lambda: write(labels, names[:-1]),
        "label beyond k": lambda: write(np.where(labels == 1, K + 1, labels).astype(labels.dtype), names),
        "not a TIFF": lambda: path.write_bytes(b"not a tiff"),
        "plain TIFF": lambda: tifffile.imwrite(path, labels),
    }


@pytest.mark.parametrize(
    "change", ["missing", "size", "dtype", "label names", "label beyond k", "not a TIFF", "plain TIFF"]
)
def test_a_finished_run_whose_label_map_is_not_its_own_is_computed_anew(slide, runs, tmp_path, change):
    concepts, classes = runs
    out = tmp_path / "run"
    _segmenter().run(slide, out)
    _label_map_of_another_run(out / "labels.ome.tif", _labels(concepts))[change]()
    result = _segmenter(CLASSES).run(slide, out)
    assert result.tiles_computed == result.tiles == classes.tiles and result.merged
    np.testing.assert_array_equal(_labels(result), _labels(classes))
    assert result.summary["classes"] == classes.summary["classes"]
    assert not WorkDir(out).path.exists()
