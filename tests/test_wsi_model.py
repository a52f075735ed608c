"""Whole slides end to end with a real (tiny, random) ViT through fseg_jax.segmentation.make_token_fn.

The model has UNI's architecture with one block of width 64, so that every test compiles and runs in
seconds on CPU; the slide machinery does not depend on the model's size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_vit

from fseg_jax.wsi import pipeline

K = 5
SVS_SIZE_AT_4UM = (277, 370)  # 2220 x 2967 px at 0.499 um/px, seen at 4 um/px


def uni_tiny_config():
    """UNI's architecture with one block of width 64 (patch 16, class token, 14 x 14 position grid)."""
    from fseg_jax import ViTConfig

    return dataclasses.replace(
        ViTConfig.from_preset("uni"), name="uni-tiny", depth=1, embed_dim=64, num_heads=2, mlp_hidden=128
    )


@pytest.fixture(scope="module")
def model():
    return tiny_vit(uni_tiny_config())


@pytest.fixture(scope="module")
def concepts():
    return np.abs(np.random.default_rng(0).normal(size=(K, 64))).astype(np.float32)


@pytest.fixture(scope="module")
def svs(shared_data):
    return shared_data / "he" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def synthetic_slide(tmp_path_factory):
    """An OME-TIFF of synthetic tissue, 1600 x 1200 px at 0.5 um/px (200 x 150 px at 4 um/px: 6 tiles of 128)."""
    from test_wsi import synthetic_he, write_ome_tiff

    image, _ = synthetic_he(1200, 1600, seed=7)
    return write_ome_tiff(tmp_path_factory.mktemp("synthetic") / "synthetic.ome.tif", image, mpp=0.5, levels=4)


def _token_outputs(out: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(out / "weights.safetensors")


def test_svs_end_to_end(svs, model, concepts, tmp_path):
    import shapely
    import tifffile

    import fseg_jax

    out = tmp_path / "cmu"
    result = fseg_jax.segment_slide(
        svs, out, model=model, concepts=concepts, mpp=4.0, tile=128, margin=16, batch=4, save_weights=True
    )
    assert result.complete and result.tiles == result.tiles_computed > 0
    width, height = SVS_SIZE_AT_4UM
    with tifffile.TiffFile(out / "labels.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].shape == (height, width)
        assert 'PhysicalSizeX="4.0"' in tif.ome_metadata and 'PhysicalSizeY="4.0"' in tif.ome_metadata
        labels = tif.series[0].asarray()
    assert labels.dtype == np.uint8 and labels.max() <= K and (labels == 0).any() and (labels > 0).any()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["slide"] == str(svs) and summary["backend"] == "openslide"
    assert (summary["model"], summary["bank"], summary["k"], summary["mpp"]) == ("uni-tiny", "array", K, 4.0)
    assert summary["slide_mpp"] == pytest.approx(0.499) and summary["dtype"] == "float32"
    assert len(summary["concepts"]) == K and sum(c["share_of_tissue"] for c in summary["concepts"]) == pytest.approx(1)
    assert sum(c["area_mm2"] for c in summary["concepts"]) == pytest.approx(summary["tissue_area_mm2"])
    # tissue is about a third of this slide (2220 x 2967 px at 0.499 um is 1.64 mm2)
    assert 0.3 < summary["tissue_area_mm2"] < 0.8
    assert {"jax", "flax", "tifffile", "openslide"} <= set(summary["versions"])
    assert set(summary["timing_s"]) == {"tissue", "read_wait", "compute", "write"}

    doc = json.loads((out / "labels.geojson").read_text())
    for feature in doc["features"]:
        geom = shapely.geometry.shape(feature["geometry"])
        assert shapely.is_valid(geom) and feature["properties"]["objectType"] == "annotation"
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= 2220 and maxy <= 2967
        concept = summary["concepts"][feature["properties"]["label"] - 1]
        assert geom.area * 0.499**2 / 1e6 == pytest.approx(concept["area_mm2"], rel=0.01)  # level-0 px -> mm2
    weights = _token_outputs(out)
    assert weights["weights"].shape == (24, 18, K)

    # bfloat16 compute gives (nearly) the same labels
    bf16 = pipeline.SlideSegmenter.from_model(
        model, concepts, dtype="bfloat16", tile=128, margin=16, batch=4, mpp=4.0, save_weights=True
    ).run(svs, tmp_path / "bf16")
    assert bf16.summary["dtype"] == "bfloat16"
    a, b = weights["labels"], _token_outputs(tmp_path / "bf16")["labels"]
    assert ((a == b)[a > 0]).mean() > 0.85


def test_one_tile_and_many_tiles_agree_away_from_the_border(svs, model, concepts, tmp_path):
    runs = {}
    # one 416 px tile covers the whole 277 x 370 px slide; 128 px tiles keep 4 x 4 tokens each
    for name, tile, margin in (("one", 416, 16), ("many", 128, 32)):
        seg = pipeline.SlideSegmenter.from_model(
            model, concepts, tile=tile, margin=margin, batch=4, mpp=4.0, save_weights=True
        )
        result = seg.run(svs, tmp_path / name)
        runs[name] = (result.tiles, _token_outputs(tmp_path / name))
    assert runs["one"][0] == 1 and runs["many"][0] > 10
    one, many = runs["one"][1], runs["many"][1]
    inner = np.zeros(one["labels"].shape, bool)
    inner[2:-2, 2:-2] = True
    tissue = inner & (one["labels"] > 0)
    np.testing.assert_array_equal(one["labels"] > 0, many["labels"] > 0)  # the same tissue either way
    # attention is global within a tile, so context differs; margins keep the labels close (with LayerScale
    # in [0.1, 1] the block mixes the tile's tokens: measured 83 % of the labels equal, correlation 0.976)
    assert (one["labels"] == many["labels"])[tissue].mean() > 0.75
    assert np.corrcoef(one["weights"][tissue].ravel(), many["weights"][tissue].ravel())[0, 1] > 0.95


def _svs_tile(svs) -> np.ndarray:
    """The pixels one 416 px tile with a 16 px margin reads from the slide at 4 um/px (glass outside it)."""
    from fseg_jax.wsi import open_slide

    with open_slide(svs) as s:
        return s.read(s.plan(4.0), -16, -16, 416, 416)


def _labels(out: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(out / "labels.ome.tif")


@pytest.mark.parametrize(
    "options", [{}, {"solver": "hals", "max_iter": 3}, {"method": "factorize", "n_components": 4}],
    ids=["default", "hals-3-sweeps", "factorize"],
)
def test_one_tile_equals_segment_on_its_pixels(svs, model, concepts, tmp_path, options):
    """One tile covers the 277 x 370 px slide: per pixel, its labels are segment()'s on the tile's pixels, for
    "factorize" too (one meaning: component weights upsampled, argmaxed, mapped to concepts)."""
    import fseg_jax

    seg = pipeline.SlideSegmenter.from_model(model, concepts, tile=416, margin=16, batch=4, mpp=4.0, **options)
    result = seg.run(svs, tmp_path / "one")
    assert result.tiles == 1 and all(result.summary[name] == v for name, v in options.items())
    labels = _labels(tmp_path / "one")
    pixels = _svs_tile(svs)
    expected = np.asarray(fseg_jax.segment(pixels, concepts, model=model, **options))[16:386, 16:293] + 1
    tissue = labels > 0
    assert tissue.sum() > 20000
    assert (labels == expected)[tissue].mean() >= 0.999  # measured: 1.0 (every pixel) for both
    if "solver" in options:  # the options reach the step: three HALS sweeps stop far from the default solver's optimum
        default = np.asarray(fseg_jax.segment(pixels, concepts, model=model))[16:386, 16:293] + 1
        assert (labels == default)[tissue].mean() < 0.9  # measured: 0.66


def test_two_by_two_tiles_agree_with_one_tile(svs, model, concepts, tmp_path):
    """The same region as one 416 px tile and as 2 x 2 tiles of 256 px (192 px cores, 32 px margins).

    Per-pixel interpolation is continuous across the seams (exact with a local model: test_wsi.py), so what
    differs is the model's context: attention is global within a tile, and each of the four tiles sees 256
    px instead of 416. Measured: 95.0 % of tissue pixels agree (the tiny model's LayerScale in [0.1, 1] lets
    its block mix the tile's tokens; with timm's default 1e-5 the block barely moved the output and 98.3 %
    agreed).
    """
    runs = {}
    for name, tile, margin in (("one", 416, 16), ("four", 256, 32)):
        seg = pipeline.SlideSegmenter.from_model(model, concepts, tile=tile, margin=margin, batch=4, mpp=4.0)
        runs[name] = (seg.run(svs, tmp_path / name).tiles, _labels(tmp_path / name))
    assert runs["one"][0] == 1 and runs["four"][0] == 4
    one, four = runs["one"][1], runs["four"][1]
    np.testing.assert_array_equal(one > 0, four > 0)
    assert (one == four)[one > 0].mean() > 0.93


def test_every_option_reaches_the_compiled_step(svs, model, concepts, tmp_path):
    """factorize with its own components, seed and solver, at token resolution: the labels are the argmax of
    make_token_fn's scores with exactly these options (the defaults give other labels)."""
    from safetensors.numpy import load_file

    from fseg_jax.segmentation import make_token_fn

    options = dict(method="factorize", n_components=3, seed=1, solver="mu", tol=1e-3, max_iter=40)
    seg = pipeline.SlideSegmenter.from_model(
        model, concepts, tile=416, margin=16, batch=4, mpp=4.0, resolution="token", save_weights=True, **options
    )
    summary = seg.run(svs, tmp_path / "f").summary
    assert summary["resolution"] == "token" and all(summary[name] == v for name, v in options.items())
    tokens = load_file(tmp_path / "f" / "weights.safetensors")["labels"]
    pixels = _svs_tile(svs)[None]

    def argmax(**opts):
        fn, params = make_token_fn(model, concepts, **opts)
        return np.asarray(fn(params, pixels))[0, 1:25, 1:19].argmax(-1) + 1

    tissue = tokens > 0
    np.testing.assert_array_equal(tokens[tissue], argmax(**options)[tissue])
    assert (tokens != argmax(method="factorize"))[tissue].any()


DEVICES_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, jax, tifffile
    from safetensors.numpy import load_file
    sys.path.insert(0, sys.argv[3])
    from test_wsi_model import K, uni_tiny_config
    from tiny_models import tiny_vit
    from fseg_jax.wsi.pipeline import SlideSegmenter

    assert jax.device_count() == 4, jax.devices()
    model = tiny_vit(uni_tiny_config())
    concepts = np.abs(np.random.default_rng(0).normal(size=(K, 64))).astype(np.float32)
    out = {}
    for n in (1, 4):
        seg = SlideSegmenter.from_model(model, concepts, tile=128, margin=16, batch=8, mpp=4.0, save_weights=True,
                                        devices=jax.devices()[:n])
        result = seg.run(sys.argv[1], f"{sys.argv[2]}/devices{n}")
        assert result.tiles == 4, result.tiles  # one batch: 4 tiles a device, or 1 on each of 4
        assert seg.step.padded_size(3) == 4 and seg.step.padded_size(5) == 8
        out[n] = load_file(f"{sys.argv[2]}/devices{n}/weights.safetensors")
        out[n]["pixels"] = tifffile.imread(f"{sys.argv[2]}/devices{n}/labels.ome.tif")
    assert np.array_equal(out[1]["labels"], out[4]["labels"])
    assert np.array_equal(out[1]["pixels"], out[4]["pixels"])
    # (4, ...) on one device and (1, ...) on each of four are different programs: float rounding differs
    np.testing.assert_allclose(out[1]["weights"], out[4]["weights"], rtol=0, atol=1e-6)
    print("identical")
    """
)


def test_one_and_four_devices_give_the_same_labels(synthetic_slide, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT, str(synthetic_slide), str(tmp_path), str(Path(__file__).parent)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("identical")


def test_cli_folder_with_a_failing_slide(synthetic_slide, model, concepts, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    save_model(model, tmp_path / "model")
    save_concepts(tmp_path / "bank.safetensors", ConceptBank({K: concepts}, model="uni-tiny", layer=-1))
    folder = tmp_path / "slides"
    folder.mkdir()
    (folder / "a_tissue.ome.tif").symlink_to(synthetic_slide)
    (folder / "b_broken.ndpi").write_bytes(b"\x00not a slide" * 64)
    args = [
        "slide", str(folder), "--model", str(tmp_path / "model"), "--concepts", str(tmp_path / "bank.safetensors"),
        "--k", str(K), "--mpp", "4", "--tile", "128", "--margin", "16", "--batch", "4", "--no-compilation-cache",
        "-o", str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "FAILED b_broken.ndpi" in result.output and "1 of 2 slides failed" in result.output
    assert sorted(p.name for p in (tmp_path / "out" / "a_tissue").iterdir()) == sorted(pipeline.OUTPUT_FILES)
    summary = json.loads((tmp_path / "out" / "a_tissue" / "summary.json").read_text())
    assert summary["model"] == str(tmp_path / "model") and summary["bank"] == str(tmp_path / "bank.safetensors")

    # a second run finds the finished slide and does not recompute it
    again = CliRunner().invoke(main, args)
    assert "a_tissue.ome.tif:" in again.output and "already done" in again.output


def test_cli_passes_every_model_option(synthetic_slide, model, concepts, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    save_model(model, tmp_path / "model")
    save_concepts(tmp_path / "bank.safetensors", ConceptBank({K: concepts, 3: concepts[:3]}, model="uni-tiny", layer=-1))
    args = [
        "slide", str(synthetic_slide), "--model", str(tmp_path / "model"), "--concepts", str(tmp_path / "bank.safetensors"),
        "--mpp", "4", "--tile", "128", "--margin", "16", "--batch", "4", "--no-compilation-cache", "-o", str(tmp_path / "out"),
    ]
    unsure = CliRunner().invoke(main, args)
    assert unsure.exit_code == 2 and "--k is required: the bank holds k in 3, 5" in unsure.output, unsure.output
    options = ["--k", "3", "--method", "factorize", "--n-components", "4", "--seed", "2", "--solver", "mu",
               "--tol", "0.001", "--max-iter", "30", "--labels", "token"]
    result = CliRunner().invoke(main, [*args, *options])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "synthetic" / "summary.json").read_text())
    expected = {"k": 3, "method": "factorize", "n_components": 4, "seed": 2, "solver": "mu", "tol": 0.001,
                "max_iter": 30, "resolution": "token"}
    assert {name: summary[name] for name in expected} == expected


def test_cli_takes_the_model_the_bank_records(synthetic_slide, model, concepts, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    save_model(model, tmp_path / "model")
    save_concepts(tmp_path / "recorded.safetensors", ConceptBank({K: concepts}, model=str(tmp_path / "model"), layer=-1))
    save_concepts(tmp_path / "unrecorded.safetensors", ConceptBank({K: concepts}, model=None, layer=-1))
    args = ["slide", str(synthetic_slide), "--mpp", "4", "--tile", "128", "--margin", "16", "--batch", "4",
            "--no-compilation-cache", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, "--concepts", str(tmp_path / "recorded.safetensors")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "out" / "synthetic" / "summary.json").read_text())
    assert summary["model"] == str(tmp_path / "model")
    refused = CliRunner().invoke(main, [*args, "--concepts", str(tmp_path / "unrecorded.safetensors")])
    assert refused.exit_code == 1 and "no model given and the concept bank records none" in refused.output


def test_models_that_differ_in_one_parameter_do_not_share_batches(synthetic_slide, model, concepts, tmp_path):
    """The resume fingerprint hashes every parameter value: a model that differs from another in one value
    of the patch embedding (49152 values, of which a strided sample of every 12th would see only one in
    twelve) recomputes the slide, where the same weights resume it."""
    from fseg_jax.hub import load_converted, save_model
    from fseg_jax.wsi.plan import model_digest

    other = tiny_vit(uni_tiny_config())
    other.patch_embed.kernel[...] = other.patch_embed.kernel[...].at[0, 0, 0, 5].add(0.5)
    options = dict(tile=128, margin=16, batch=4, mpp=4.0)
    out = tmp_path / "run"
    runs = [
        pipeline.SlideSegmenter.from_model(m, concepts, **options).run(synthetic_slide, out)
        for m in (model, tiny_vit(uni_tiny_config()), other)
    ]
    first, same, changed = runs
    assert first.tiles_computed == first.tiles > 0
    assert same.tiles_computed == 0
    assert changed.tiles_computed == changed.tiles == first.tiles

    # a model loaded from a folder is known by its files' hashes
    a, b = save_model(model, tmp_path / "a"), save_model(other, tmp_path / "b")
    assert model_digest(load_converted(a)) == model_digest(load_converted(a)) != model_digest(load_converted(b))


def test_out_of_device_memory_says_which_batch_to_try(synthetic_slide, model, concepts, tmp_path, monkeypatch):
    from jax.errors import JaxRuntimeError

    from fseg_jax.wsi import DeviceMemoryError

    seg = pipeline.SlideSegmenter.from_model(model, concepts, tile=128, margin=16, batch=4, mpp=4.0)

    def exhausted(images):
        raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12582912 bytes.")

    monkeypatch.setattr(seg.step, "dispatch", exhausted)
    expected = r"memory computing a batch of 4 tiles of 128 px: try half the batch, --batch 2 \(batch=2\)"
    with pytest.raises(DeviceMemoryError, match=expected):
        seg.run(synthetic_slide, tmp_path / "a")
    # every slide of a folder would fail alike: the error ends the batch instead of failing each slide
    copy = tmp_path / f"copy-{synthetic_slide.name}"
    copy.write_bytes(synthetic_slide.read_bytes())
    with pytest.raises(DeviceMemoryError):
        pipeline.segment_slides([synthetic_slide, copy], tmp_path / "b", seg)

    def failing(images):
        raise JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(seg.step, "dispatch", failing)
    with pytest.raises(JaxRuntimeError, match="something else"):  # other XLA errors pass as they are
        seg.run(synthetic_slide, tmp_path / "d")

    one = pipeline.SlideSegmenter.from_model(model, concepts, tile=128, margin=16, batch=1, mpp=4.0)
    monkeypatch.setattr(one.step, "dispatch", exhausted)
    with pytest.raises(DeviceMemoryError, match=r"try a smaller tile, e\.g\. --tile 64"):
        one.run(synthetic_slide, tmp_path / "c")

    # the command says it in one line and stops
    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model
    from fseg_jax.wsi.compute import TileStep

    save_model(model, tmp_path / "model")
    save_concepts(tmp_path / "bank.safetensors", ConceptBank({K: concepts}, model="uni-tiny", layer=-1))
    monkeypatch.setattr(TileStep, "dispatch", lambda self, images: exhausted(images))
    args = ["slide", str(synthetic_slide), "--model", str(tmp_path / "model"), "--concepts",
            str(tmp_path / "bank.safetensors"), "--mpp", "4", "--tile", "128", "--margin", "16", "--batch", "4",
            "--no-compilation-cache", "-o", str(tmp_path / "cli")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "Error: the device ran out of memory computing a batch of 4 tiles of 128 px" in result.output
