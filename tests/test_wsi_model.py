"""Whole slides end to end with a real (tiny, random) ViT through segment.make_token_fn.

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

from fseg_jax.wsi import pipeline

K = 5
SVS_SIZE_AT_4UM = (277, 370)  # 2220 x 2967 px at 0.499 um/px, seen at 4 um/px


def tiny_config():
    from fseg_jax import ViTConfig

    return dataclasses.replace(
        ViTConfig.from_preset("uni"), name="uni-tiny", depth=1, embed_dim=64, num_heads=2, mlp_hidden=128
    )


@pytest.fixture(scope="module")
def model():
    from flax import nnx

    from fseg_jax import VisionTransformer

    return VisionTransformer(tiny_config(), rngs=nnx.Rngs(0))


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
    # attention is global within a tile, so context differs; margins keep the labels close
    assert (one["labels"] == many["labels"])[tissue].mean() > 0.9
    assert np.corrcoef(one["weights"][tissue].ravel(), many["weights"][tissue].ravel())[0, 1] > 0.99


DEVICES_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, jax
    from flax import nnx
    from safetensors.numpy import load_file
    sys.path.insert(0, sys.argv[3])
    from test_wsi_model import K, tiny_config
    from fseg_jax import VisionTransformer
    from fseg_jax.wsi.pipeline import SlideSegmenter

    assert jax.device_count() == 4, jax.devices()
    model = VisionTransformer(tiny_config(), rngs=nnx.Rngs(0))
    concepts = np.abs(np.random.default_rng(0).normal(size=(K, 64))).astype(np.float32)
    out = {}
    for n in (1, 4):
        seg = SlideSegmenter.from_model(model, concepts, tile=128, margin=16, batch=8, mpp=4.0, save_weights=True,
                                        devices=jax.devices()[:n])
        result = seg.run(sys.argv[1], f"{sys.argv[2]}/devices{n}")
        assert 0 < result.tiles < 8, result.tiles  # one batch, padded
        out[n] = load_file(f"{sys.argv[2]}/devices{n}/weights.safetensors")
    assert np.array_equal(out[1]["labels"], out[4]["labels"])
    assert np.array_equal(out[1]["weights"], out[4]["weights"])
    print("identical")
    """
)


def test_one_and_four_devices_give_identical_outputs(synthetic_slide, tmp_path):
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
