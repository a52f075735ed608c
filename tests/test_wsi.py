"""Whole-slide pipeline: reading, tissue, tiling, outputs, resume and batches of slides.

These tests run the pipeline with a small local token function (mean colour of each patch projected onto
k fixed directions, a stand-in with make_token_fn's signature), so they check the slide machinery exactly;
tests/test_wsi_model.py runs it end to end with a real (tiny) ViT.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fseg_jax.wsi import pipeline
from fseg_jax.wsi.outputs import label_polygons, write_geojson, write_label_tiff, write_weights
from fseg_jax.wsi.reader import SlideError, open_slide
from fseg_jax.wsi.sampling import array_sampler, token_sampler
from fseg_jax.wsi.store import WorkDir
from fseg_jax.wsi.tiling import TileGrid
from fseg_jax.wsi.tissue import detect_tissue, tissue_mask

PATCH = 16
K = 4


# --- synthetic slides ---------------------------------------------------------------------------------


def synthetic_he(height: int, width: int, *, seed: int = 0, blobs: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(image (h, w, 3) uint8, tissue (h, w) bool): textured pink and purple ellipses on near-white glass."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(242, 3, (height, width, 3)), 0, 255)
    tissue = np.zeros((height, width), bool)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(blobs):
        cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
        ry, rx = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
        tissue |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    # eosin-pink stroma with haematoxylin-purple nuclei, and a darker region so that concepts differ
    stroma = np.array([225.0, 140.0, 185.0]) + rng.normal(0, 12, (height, width, 3))
    stroma[:, : width // 2] -= np.array([40.0, 50.0, 10.0])
    nuclei = rng.random((height, width)) < 0.03
    stroma[nuclei] = np.array([110.0, 60.0, 150.0]) + rng.normal(0, 10, (int(nuclei.sum()), 3))
    img[tissue] = stroma[tissue]
    return np.clip(img, 0, 255).astype(np.uint8), tissue


def write_ome_tiff(path: Path, image: np.ndarray, *, mpp: float | None, levels: int = 3, tile: int = 128) -> Path:
    """A pyramidal (SubIFD) tiled OME-TIFF of an RGB image, with or without physical pixel size."""
    import tifffile

    metadata = {"axes": "YXS"}
    if mpp is not None:
        metadata |= {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tif:
        for level in range(levels):
            f = 2**level
            h, w = image.shape[0] // f, image.shape[1] // f
            data = image[: h * f, : w * f].reshape(h, f, w, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
            kw = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
            if mpp is not None:
                kw |= {"resolution": (1e4 / (mpp * f), 1e4 / (mpp * f)), "resolutionunit": "CENTIMETER"}
            if level == 0:
                tif.write(data, subifds=levels - 1, metadata=metadata, **kw)
            else:
                tif.write(data, subfiletype=1, **kw)
    return path


def standin_token_fn(k: int = K, patch: int = PATCH):
    """fn(params, images_bhw3_uint8) -> (B, h, w, k): closeness of each patch's mean colour to k reference colours."""
    colours = np.array([[0.88, 0.55, 0.73], [0.73, 0.35, 0.69], [0.43, 0.24, 0.59], [0.95, 0.95, 0.95]], np.float32)
    params = {"colours": jnp.asarray(colours[:k])}

    def fn(params, images):
        x = images.astype(jnp.float32) / 255.0
        b, h, w, _ = x.shape
        means = x.reshape(b, h // patch, patch, w // patch, patch, 3).mean(axis=(2, 4))
        return jnp.exp(-(((means[..., None, :] - params["colours"]) ** 2).sum(-1)) / 0.05)

    return fn, params


@pytest.fixture(scope="module")
def segmenter():
    fn, params = standin_token_fn()
    return pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=2, mpp=1.0, save_weights=True,
        info={"model": "standin"},
    )


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Synthetic OME-TIFFs at 0.5 um/px: tissue with mpp, the same without mpp, blank glass, tiny."""
    root = tmp_path_factory.mktemp("slides")
    image, tissue = synthetic_he(600, 800, seed=1)
    blank, _ = synthetic_he(400, 400, seed=2, blobs=0)
    tiny, _ = synthetic_he(90, 70, seed=3, blobs=1)
    tiny[10:80, 10:60] = (200, 110, 170)
    return {
        "tissue": write_ome_tiff(root / "tissue.ome.tif", image, mpp=0.5),
        "tissue_mask": tissue,
        "image": image,
        "no_mpp": write_ome_tiff(root / "no_mpp.ome.tif", image, mpp=None),
        "blank": write_ome_tiff(root / "blank.ome.tif", blank, mpp=0.5),
        "tiny": write_ome_tiff(root / "tiny.ome.tif", tiny, mpp=0.5, levels=1, tile=16),
    }


# --- reading ------------------------------------------------------------------------------------------


def test_svs_reader(shared_data):
    with open_slide(shared_data / "he" / "cmu_small_region.svs") as s:
        assert s.backend == "openslide"
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        near = s.plan(0.5)  # within 2 % of a level: that level as it is, at its own mpp
        assert (near.level, near.scale, near.mpp, near.size) == (0, 1.0, pytest.approx(0.499), (2220, 2967))
        coarse = s.plan(2.0)
        assert coarse.scale == pytest.approx(2.0 / 0.499)
        assert coarse.size == (round(2220 * 0.499 / 2), round(2967 * 0.499 / 2))
        region = s.read(coarse, 100, 200, 64, 48)
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8
        # outside the slide reads as white glass
        assert (s.read(near, -40, -40, 32, 32) == 255).all()


def test_ome_tiff_reader_levels_and_mpp(slides):
    with open_slide(slides["tissue"]) as s:
        assert s.backend == "tiffslide"
        assert len(s.level_dimensions) == 3 and s.mpp == pytest.approx(0.5)
        plan = s.plan(1.0)
        assert (plan.level, plan.scale, plan.size) == (1, 1.0, (400, 300))
        expected = slides["image"][:600, :800].reshape(300, 2, 400, 2, 3).mean(axis=(1, 3)).round()
        np.testing.assert_array_equal(s.read(plan, 0, 0, 400, 300), expected.astype(np.uint8))
        resized = s.read(s.plan(0.75), 10, 10, 50, 40)  # between levels: level 0 resampled
        assert resized.shape == (40, 50, 3)
        assert s.plan(0.75).level == 0


def test_missing_mpp_is_a_clear_error_unless_given(slides):
    with open_slide(slides["no_mpp"]) as s:
        with pytest.raises(SlideError, match="slide_mpp"):
            s.plan(0.5)
    with open_slide(slides["no_mpp"], slide_mpp=0.25) as s:
        assert s.plan(0.5).level == 1


@pytest.mark.parametrize("tile, size, unit", [(None, 0.499, "µm"), ((256, 256), 499.0, "nm")])
def test_ome_tiff_pixel_size_comes_from_the_ome_xml(tmp_path, tile, size, unit):
    """An OME-TIFF that records its pixel size only in the OME-XML (no resolution tags), stripped or tiled."""
    import tifffile

    image, _ = synthetic_he(640, 640)
    metadata = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size, "PhysicalSizeXUnit": unit,
                "PhysicalSizeYUnit": unit}
    tifffile.imwrite(tmp_path / "x.ome.tif", image, ome=True, tile=tile, metadata=metadata)
    with open_slide(tmp_path / "x.ome.tif") as s:
        assert s.mpp == pytest.approx(0.499) and s.dimensions == (640, 640)
        np.testing.assert_array_equal(s.read(s.plan(0.5), 0, 0, 640, 640), image)


def test_plain_image_reader(tmp_path):
    from PIL import Image

    image, _ = synthetic_he(60, 80)
    Image.fromarray(image).save(tmp_path / "x.png")
    with pytest.raises(SlideError, match="microns per pixel"):
        open_slide(tmp_path / "x.png").mpp
    with open_slide(tmp_path / "x.png", slide_mpp=0.5) as s:
        assert s.backend == "image" and s.dimensions == (80, 60)
        np.testing.assert_array_equal(s.read(s.plan(0.5), 0, 0, 80, 60), image)



@pytest.mark.parametrize(
    "unit, per_unit, mpp", [("CENTIMETER", 20_000.0, 0.5), ("INCH", 101_600.0, 0.25), ("NONE", 1.0, None)]
)
def test_image_mpp_from_tiff_resolution_tags(tmp_path, unit, per_unit, mpp):
    """A TIFF read as a plain image (by a name no slide library claims) takes its mpp from XResolution."""
    import tifffile

    image, _ = synthetic_he(60, 80)
    tifffile.imwrite(tmp_path / "scan.img", image, resolution=(per_unit, per_unit), resolutionunit=unit)
    with open_slide(tmp_path / "scan.img", slide_mpp=None) as s:
        assert s.backend == "image"
        if mpp is None:
            with pytest.raises(SlideError, match="microns per pixel"):
                s.mpp
        else:
            assert s.mpp == pytest.approx(mpp)
            np.testing.assert_array_equal(s.read(s.plan(mpp), 0, 0, 80, 60), image)

@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("name, content", [("broken.svs", b"\x00garbage" * 100), ("notes.txt", b"hello"),
                                           ("trunc.tif", b"II*\x00\x08\x00\x00\x00")])
def test_unreadable_file_is_one_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SlideError, match="not a readable slide or image"):
        open_slide(path)
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "absent.svs")


# --- tissue and tiling ----------------------------------------------------------------------------------


def test_tissue_mask_finds_tissue_and_drops_specks():
    image, tissue = synthetic_he(300, 400, seed=4)
    image[5:8, 5:8] = (120, 40, 160)  # a speck of 9 px: far below 0.01 mm2 at 1 um/px
    mask = tissue_mask(image, mpp=1.0)
    iou = (mask & tissue).sum() / (mask | tissue).sum()
    assert iou > 0.95 and not mask[5:8, 5:8].any()
    blank, _ = synthetic_he(300, 400, seed=5, blobs=0)
    assert not tissue_mask(blank, mpp=1.0).any()


def test_token_tissue_is_judged_on_the_part_inside_the_slide(tmp_path):
    """Token (r, c) covers working pixels [16c, 16c+16): the thumbnail maps onto the grid without stretching."""
    from PIL import Image

    image, _ = synthetic_he(70, 100, blobs=0)
    image[:, 80:] = (200, 110, 170)  # tissue in working pixels x >= 80: token columns 5 and 6 (96..112)
    Image.fromarray(image).save(tmp_path / "edge.png")
    with open_slide(tmp_path / "edge.png", slide_mpp=1.0) as s:
        thumb, tokens = detect_tissue(s, size=(100, 70), patch=16)
    assert thumb.shape == (70, 100, 3) and tokens.shape == (5, 7)
    # column 6 lies a quarter inside the slide (x 96..100 of 96..112) and row 4 three eighths (y 64..70 of
    # 64..80): each is judged on the part that exists, all tissue, so the tissue runs to the slide's edge
    expected = np.zeros((5, 7), bool)
    expected[:, 5:] = True
    np.testing.assert_array_equal(tokens, expected)

    image[:, 80:] = 255  # glass again, and tissue only in the slide's last 3 pixels of columns (97..100)
    image[:, 97:] = (200, 110, 170)
    Image.fromarray(image).save(tmp_path / "edge.png")
    with open_slide(tmp_path / "edge.png", slide_mpp=1.0) as s:
        _, tokens = detect_tissue(s, size=(100, 70), patch=16)
    # column 6's part inside the slide (96..100) is three quarters tissue; column 5 (80..96) holds none
    expected = np.zeros((5, 7), bool)
    expected[:, 6] = True
    np.testing.assert_array_equal(tokens, expected)


def test_tile_cores_cover_the_token_grid_once():
    grid = TileGrid.for_slide((1000, 700), patch=16, tile=256, margin=32)
    assert grid.tokens_hw == (44, 63) and grid.core_tokens == 12 and grid.shape == (4, 6)
    cover = np.zeros(grid.tokens_hw, int)
    for i in range(len(grid)):
        rs, cs = grid.core_slices(i)
        cover[rs, cs] += 1
        x, y, w, h = grid.read_box(i)
        assert (w, h) == (256, 256) and x % 16 == 0 and y % 16 == 0
        assert x + 32 == cs.start * 16 and y + 32 == rs.start * 16  # the core sits one margin inside
    assert (cover == 1).all()
    mask = np.zeros(grid.tokens_hw, bool)
    mask[13, 25] = True  # core of tile row 1, col 2
    assert grid.tiles_with(mask).tolist() == [1 * 6 + 2]
    with pytest.raises(ValueError, match="multiples of the patch"):
        TileGrid.for_slide((100, 100), patch=16, tile=200)


# --- outputs -----------------------------------------------------------------------------------------


def test_label_polygons_are_valid_with_holes():
    import shapely

    labels = np.zeros((14, 14), np.uint8)
    labels[1:11, 1:11] = 1
    labels[3:8, 3:8] = 2
    labels[4:6, 4:6] = 1  # an island of 1 inside the hole
    labels[12:14, 0:3] = 1
    geom = label_polygons(labels, 1)
    assert shapely.is_valid(geom) and geom.geom_type == "MultiPolygon"
    assert sorted(len(p.interiors) for p in geom.geoms) == [0, 0, 1]
    assert geom.area == (labels == 1).sum()  # the polygons follow token edges exactly
    diagonal = np.eye(4, dtype=np.uint8)  # tokens touching only at corners: separate, still valid
    assert shapely.is_valid(label_polygons(diagonal, 1)) and label_polygons(diagonal, 1).area == 4
    assert label_polygons(labels, 3) is None


def test_geojson_is_qupath_shaped(tmp_path):
    import shapely

    labels = np.zeros((10, 12), np.uint8)
    labels[2:6, 3:9] = 1
    labels[6:9, 1:4] = 3
    colors = np.array([[9, 9, 9], [200, 0, 0], [0, 200, 0], [0, 0, 200]], np.uint8)
    n = write_geojson(tmp_path / "l.geojson", labels, names=["bg", "a", "b", "c"], colors=colors, scale=(32.0, 32.0))
    doc = json.loads((tmp_path / "l.geojson").read_text())
    assert n == 2 and doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for feature, (name, color, value) in zip(doc["features"], [("a", [200, 0, 0], 1), ("c", [0, 0, 200], 3)]):
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": name, "color": color}
        geom = shapely.geometry.shape(feature["geometry"])
        assert shapely.is_valid(geom)
        assert geom.area == (labels == value).sum() * 32 * 32
    assert shapely.geometry.shape(doc["features"][0]["geometry"]).bounds == (3 * 32, 2 * 32, 9 * 32, 6 * 32)


def test_label_tiff_is_pyramidal_ome_with_physical_size(tmp_path):
    import tifffile

    labels = np.random.default_rng(0).integers(0, 5, (40, 50)).astype(np.uint8)
    write_label_tiff(
        tmp_path / "l.ome.tif", token_sampler(labels, 16), size=(795, 630), dtype=labels.dtype, mpp=0.5, tile=128,
        min_level_side=150,
    )
    with tifffile.TiffFile(tmp_path / "l.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert [lvl.shape for lvl in series.levels] == [(630, 795), (315, 398), (158, 199)]
        full = series.asarray()
        np.testing.assert_array_equal(full, np.repeat(np.repeat(labels, 16, 0), 16, 1)[:630, :795])
        # reduced levels: the label at each block's top-left pixel
        np.testing.assert_array_equal(series.levels[2].asarray(), full[::4, ::4])
        pixels = tif.ome_metadata
        assert 'PhysicalSizeX="0.5"' in pixels and 'PhysicalSizeXUnit="µm"' in pixels
        assert tif.pages[0].tags["XResolution"].value == (20000, 1)  # pixels per cm
    assert not list(tmp_path.glob(".*tmp"))


def test_label_tiff_streams_from_a_memory_map(tmp_path):
    """A 6000 x 6000 label map on disk becomes a TIFF while at most a few bands are in memory."""
    import tracemalloc

    import tifffile

    labels = np.memmap(tmp_path / "labels.raw", dtype=np.uint8, mode="w+", shape=(6000, 6000))
    labels[1000:5000:7, :] = 3
    labels[:, 2500:2600] = 1
    labels.flush()
    tracemalloc.start()
    try:
        write_label_tiff(tmp_path / "l.ome.tif", array_sampler(labels), size=(6000, 6000), dtype=np.uint8, mpp=0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 36e6 / 4  # measured: about 9 MB (bands of 256 x 6000 and tifffile's buffers)
    with tifffile.TiffFile(tmp_path / "l.ome.tif") as tif:
        np.testing.assert_array_equal(tif.series[0].asarray(), labels)
        assert tif.series[0].levels[3].shape == (750, 750)
    # a sparse sample (as the GeoJSON traces) reads a few rows at a time and gives the same pixels
    ys, xs = np.arange(0, 6000, 16), np.arange(0, 6000, 16)
    tracemalloc.start()
    try:
        sampled = array_sampler(labels, read_bytes=10 * 6000)(ys, xs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(sampled, np.asarray(labels)[::16, ::16])
    assert peak < 375 * 6000  # under the 375 full rows the sample touches


def test_weights_file_is_written_from_a_memory_map_in_slabs(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    weights = np.memmap(tmp_path / "weights.raw", dtype=np.float32, mode="w+", shape=(37, 23, 5))
    weights[:] = rng.random(weights.shape, np.float32)
    labels = rng.integers(0, 6, (37, 23)).astype(np.int32)
    # 460 bytes a row of weights: two rows per write
    write_weights(tmp_path / "w.safetensors", {"weights": weights, "labels": labels}, {"mpp": "1.0"}, chunk_bytes=1000)
    back = load_file(tmp_path / "w.safetensors")
    assert back.keys() == {"weights", "labels"}
    np.testing.assert_array_equal(back["weights"], weights)
    np.testing.assert_array_equal(back["labels"], labels)
    with safe_open(tmp_path / "w.safetensors", "numpy") as f:
        assert f.metadata() == {"mpp": "1.0"}


# --- the pipeline -------------------------------------------------------------------------------------


def _read_labels(out_dir: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(out_dir / "labels.ome.tif")


def test_slide_outputs(segmenter, slides, tmp_path):
    import shapely
    import tifffile
    from safetensors.numpy import load_file

    out = tmp_path / "tissue"
    result = segmenter.run(slides["tissue"], out)
    assert result.complete and result.tiles == result.tiles_computed > 0
    assert sorted(p.name for p in out.iterdir()) == sorted([*pipeline.OUTPUT_FILES, "weights.safetensors"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    # the working resolution is pyramid level 1 (1 um/px): 400 x 300 px, 25 x 19 tokens
    assert summary["size"] == [400, 300] and summary["mpp"] == 1.0 and summary["tokens"] == [19, 25]
    with tifffile.TiffFile(out / "labels.ome.tif") as tif:
        assert tif.series[0].shape == (300, 400)
        assert 'PhysicalSizeX="1.0"' in tif.ome_metadata
    labels = _read_labels(out)
    tokens = labels[::PATCH, ::PATCH]
    # background (0) outside the tissue, concepts (1..k) inside it, at token resolution
    truth = slides["tissue_mask"][::2, ::2][8::PATCH, 8::PATCH][: tokens.shape[0], : tokens.shape[1]]
    assert ((tokens > 0) == truth).mean() > 0.95
    assert set(np.unique(tokens)) <= set(range(K + 1)) and len(np.unique(tokens[tokens > 0])) >= 2
    # tissue-only computation: tiles without tissue were never read
    grid = TileGrid.for_slide((400, 300), patch=PATCH, tile=128, margin=16)
    assert summary["tiles"] == {"grid": len(grid), "tissue": result.tiles} and result.tiles < len(grid)
    # areas: pixel counts at 1 um x 1 um (the last token row overhangs the slide by 4 px)
    counts = np.bincount(labels.ravel(), minlength=K + 1)
    for c in summary["concepts"]:
        assert c["area_mm2"] == pytest.approx(counts[c["label"]] * 1e-6)
    assert sum(c["share_of_tissue"] for c in summary["concepts"]) == pytest.approx(1.0)
    assert summary["tissue_area_mm2"] == pytest.approx(counts[1:].sum() * 1e-6)
    # GeoJSON polygons in level-0 pixels (0.5 um/px: 2 px per working px), traced from every pixel here
    # and simplified by half a pixel
    assert summary["resolution"] == "pixel" and summary["geojson"] == {"step_px": 1, "tolerance_px": 0.5}
    doc = json.loads((out / "labels.geojson").read_text())
    present = {int(v) for v in np.unique(labels) if v > 0}
    assert {f["properties"]["label"] for f in doc["features"]} == present
    for f in doc["features"]:
        geom = shapely.geometry.shape(f["geometry"])
        assert shapely.is_valid(geom) and geom.geom_type in ("Polygon", "MultiPolygon")
        label = f["properties"]["label"]
        # simplification moves edges by at most half a pixel: the area changes by less than half the
        # boundary's length (measured here: well under 1 %)
        assert abs(geom.area - counts[label] * 2 * 2) <= 0.5 * 2 * geom.length / 2
        assert geom.area == pytest.approx(counts[label] * 2 * 2, rel=0.02)
        minx, miny, maxx, maxy = geom.bounds
        assert 0 <= minx and maxx <= 800 and 0 <= miny and maxy <= 600
    weights = load_file(out / "weights.safetensors")
    assert weights["weights"].shape == (19, 25, K)
    np.testing.assert_array_equal(weights["labels"] > 0, tokens > 0)
    np.testing.assert_array_equal(weights["weights"][tokens == 0], 0)
    np.testing.assert_array_equal(weights["weights"].argmax(-1)[tokens > 0] + 1, weights["labels"][tokens > 0])
    # a second run finds the outputs and computes nothing
    again = segmenter.run(slides["tissue"], out)
    assert again.tiles_computed == 0 and again.summary == summary


def test_labels_match_a_direct_computation(segmenter, slides, tmp_path):
    """The stand-in is local, so tiling must reproduce it on the whole image exactly: per pixel, the
    bilinear upsampling runs on across tile seams as on one image (read with a ring of glass tokens, which
    the tiles at the slide's edge see in their margins)."""
    from fseg_jax.upsample import upsample_argmax

    fn, params = standin_token_fn()
    segmenter.run(slides["tissue"], tmp_path / "t")
    labels = _read_labels(tmp_path / "t")
    with open_slide(slides["tissue"]) as s:
        whole = s.read(s.plan(1.0), -PATCH, -PATCH, 27 * PATCH, 21 * PATCH)
    weights = fn(params, whole[None])[0]
    direct = np.asarray(upsample_argmax(weights, (21 * PATCH, 27 * PATCH)))[PATCH : PATCH + 300, PATCH : PATCH + 400] + 1
    inside = labels > 0
    assert inside.sum() > 20000
    np.testing.assert_array_equal(labels[inside], direct[inside])
    # and in token resolution, the argmax per token
    token_seg = pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=2, mpp=1.0, resolution="token"
    )
    token_seg.run(slides["tissue"], tmp_path / "token")
    tokens = _read_labels(tmp_path / "token")
    per_token = np.repeat(np.repeat(np.asarray(weights).argmax(-1) + 1, PATCH, 0), PATCH, 1)[PATCH : PATCH + 300, PATCH : PATCH + 400]
    np.testing.assert_array_equal(tokens[tokens > 0], per_token[tokens > 0])
    np.testing.assert_array_equal(tokens > 0, inside)


def test_token_resolution_outputs(slides, tmp_path):
    """Token squares in the TIFF, and GeoJSON polygons along the token edges exactly."""
    import shapely
    from safetensors.numpy import load_file

    fn, params = standin_token_fn()
    seg = pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=2, mpp=1.0, resolution="token", save_weights=True
    )
    summary = seg.run(slides["tissue"], tmp_path / "t").summary
    assert summary["resolution"] == "token" and summary["geojson"] == {"step_px": PATCH, "tolerance_px": 0.0}
    labels = _read_labels(tmp_path / "t")
    tokens = load_file(tmp_path / "t" / "weights.safetensors")["labels"]
    np.testing.assert_array_equal(labels, np.repeat(np.repeat(tokens, PATCH, 0), PATCH, 1)[:300, :400])
    counts = np.bincount(labels.ravel(), minlength=K + 1)
    for f in json.loads((tmp_path / "t" / "labels.geojson").read_text())["features"]:
        geom = shapely.geometry.shape(f["geometry"])
        assert shapely.is_valid(geom) and geom.area == pytest.approx(counts[f["properties"]["label"]] * 4)


def test_blank_and_tiny_slides(segmenter, slides, tmp_path):
    blank = segmenter.run(slides["blank"], tmp_path / "blank")
    assert blank.complete and blank.tiles == 0
    assert not _read_labels(tmp_path / "blank").any()
    assert json.loads((tmp_path / "blank" / "labels.geojson").read_text())["features"] == []
    assert all(c["area_mm2"] == 0 for c in blank.summary["concepts"])

    tiny = segmenter.run(slides["tiny"], tmp_path / "tiny")  # 45 x 35 working px, one padded tile
    assert tiny.tiles == 1
    labels = _read_labels(tmp_path / "tiny")
    assert labels.shape == (45, 35) and labels.max() > 0


def _killed_at_the_third_batch(segmenter, slide, out: Path, monkeypatch) -> None:
    """Run `slide` into `out` and kill the run while its third batch file is being written (a one-process run
    has already painted that batch into the label map)."""
    real_put = WorkDir.put
    calls = {"n": 0}

    def dying_put(self, index, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            path = self.batch_path(index, args[0])
            with open(path.with_name(f".{path.name}.tmp"), "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt
        return real_put(self, index, *args, **kwargs)

    monkeypatch.setattr(WorkDir, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        segmenter.run(slide, out)
    monkeypatch.setattr(WorkDir, "put", real_put)
    assert WorkDir(out).done(WorkDir(out).read_plan()["fingerprint"]) == {0, 1}


def _batch_contents(out: Path) -> list[set[str]]:
    """The arrays each batch file of a slide's work folder holds."""
    contents = []
    for path in sorted(WorkDir(out).path.glob("batch-*.npz")):
        with np.load(path) as z:
            contents.append(set(z.files))
    return contents


def _assert_same_outputs(out: Path, reference: Path) -> None:
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(_read_labels(out), _read_labels(reference))
    weights, expected = load_file(out / "weights.safetensors"), load_file(reference / "weights.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(weights[name], expected[name])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())


def test_resume_after_a_kill(segmenter, slides, tmp_path, monkeypatch):
    reference = segmenter.run(slides["tissue"], tmp_path / "reference")
    assert reference.tiles > 2 * segmenter.step.batch

    out = tmp_path / "killed"
    _killed_at_the_third_batch(segmenter, slides["tissue"], out, monkeypatch)
    assert not any((out / name).exists() for name in pipeline.OUTPUT_FILES)
    (out / ".labels.ome.tif.4242.tmp").write_bytes(b"half")  # as a kill while writing outputs leaves it

    resumed = segmenter.run(slides["tissue"], out)
    assert resumed.tiles_computed == reference.tiles - 2 * segmenter.step.batch and resumed.replaced is None
    _assert_same_outputs(out, tmp_path / "reference")


def test_a_one_process_run_paints_its_batches_as_the_split_merge_does(segmenter, slides, tmp_path, monkeypatch):
    """One process paints each batch into the work folder's maps as it finishes, its batch files carrying
    no labels; the processes of a split slide save theirs for the merge to paint. The outputs are the same."""
    seen = {}
    real_merge = pipeline.merge_slide

    def merge(out_dir):
        seen["batches"] = _batch_contents(out_dir)
        seen["maps"] = sorted(p.name for p in WorkDir(out_dir).path.glob("*.raw"))
        return real_merge(out_dir)

    monkeypatch.setattr(pipeline, "merge_slide", merge)
    one = segmenter.run(slides["tissue"], tmp_path / "one")
    monkeypatch.setattr(pipeline, "merge_slide", real_merge)
    assert len(seen["batches"]) == -(-one.tiles // segmenter.step.batch)
    assert all(files == {"tiles", "seconds", "read_wait", "process", "host"} for files in seen["batches"])
    assert seen["maps"] == ["labels.raw", "weights.raw"]

    split = tmp_path / "split"
    for i in range(2):
        segmenter.run(slides["tissue"], split, part=(i, 2))
    assert all({"labels", "weights"} <= files for files in _batch_contents(split))
    pipeline.merge_slide(split)
    _assert_same_outputs(split, tmp_path / "one")


def test_a_lost_label_map_makes_its_batches_computed_again(segmenter, slides, tmp_path, monkeypatch):
    """Batches whose labels were in a map that is gone, or of another size, are not done: a resumed run
    computes them again and says so, a merge refuses to write them as background."""
    reference = segmenter.run(slides["tissue"], tmp_path / "reference")
    out = tmp_path / "removed"
    _killed_at_the_third_batch(segmenter, slides["tissue"], out, monkeypatch)
    (WorkDir(out).path / "labels.raw").unlink()
    resumed = segmenter.run(slides["tissue"], out)
    assert resumed.tiles_computed == reference.tiles
    assert resumed.replaced.startswith("discarded 2 finished batches whose labels were in the maps of ")
    _assert_same_outputs(out, tmp_path / "reference")

    out = tmp_path / "shrunk"
    _killed_at_the_third_batch(segmenter, slides["tissue"], out, monkeypatch)
    with open(WorkDir(out).path / "weights.raw", "r+b") as f:
        f.truncate(64)
    n = len(WorkDir(out).read_plan()["batches"])
    lost = rf"{n} of {n} batches not computed yet \(0, 1, 2.*; 2 of them .*\(labels.raw, weights.raw\), one missing"
    with pytest.raises(ValueError, match=lost):
        pipeline.merge_slide(out)  # never merged as background
    assert segmenter.run(slides["tissue"], out).tiles_computed == reference.tiles
    _assert_same_outputs(out, tmp_path / "reference")


@pytest.mark.parametrize("first", ["one process", "split"])
def test_a_slide_started_one_way_is_finished_the_other(segmenter, slides, tmp_path, monkeypatch, first):
    """A one-process run killed and finished by the processes of a split slide, or a split run's share
    finished by one process: the maps and the saved batches make the same outputs."""
    reference = segmenter.run(slides["tissue"], tmp_path / "reference")
    out = tmp_path / "mixed"
    if first == "one process":
        _killed_at_the_third_batch(segmenter, slides["tissue"], out, monkeypatch)
        computed = [segmenter.run(slides["tissue"], out, part=(i, 2)).tiles_computed for i in range(2)]
        pipeline.merge_slide(out)
        assert sum(computed) == reference.tiles - 2 * segmenter.step.batch
    else:
        half = segmenter.run(slides["tissue"], out, part=(0, 2))
        rest = segmenter.run(slides["tissue"], out)
        assert half.tiles_computed + rest.tiles_computed == reference.tiles and rest.complete
    _assert_same_outputs(out, tmp_path / "reference")


def test_changed_settings_start_afresh(slides, tmp_path):
    fn, params = standin_token_fn()
    first = pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=4, mpp=1.0, save_weights=True
    )
    first.run(slides["tissue"], tmp_path / "s")
    assert (tmp_path / "s" / "weights.safetensors").is_file()
    other = pipeline.SlideSegmenter(fn, params, patch_size=PATCH, k=K, tile=128, margin=32, batch=4, mpp=1.0)
    result = other.run(slides["tissue"], tmp_path / "s")
    assert result.tiles_computed == result.tiles > 0 and result.summary["margin"] == 32
    # no weights from the earlier settings are left beside the new labels
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(pipeline.OUTPUT_FILES)


def test_batches_compile_once_per_power_of_two(slides, tmp_path):
    """A short batch runs at the next power of two, not padded to the full batch; each size compiles once."""
    import chex

    fn, params = standin_token_fn()
    sizes = []

    def recorded(params, images):
        sizes.append(images.shape)
        return fn(params, images)

    counted = chex.assert_max_traces(recorded, n=3)
    seg = pipeline.SlideSegmenter(counted, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=4, mpp=1.0)
    many = seg.run(slides["tissue"], tmp_path / "tissue")
    tiny = seg.run(slides["tiny"], tmp_path / "tiny")  # one tile, padded at the slide's edge, not in the batch
    again = seg.run(slides["tissue"], tmp_path / "again")  # every size seen: no new compilation
    assert many.tiles == again.tiles == 6 and tiny.tiles == 1  # batches of 4 and 2 tiles
    assert sizes == [(4, 128, 128, 3), (2, 128, 128, 3), (1, 128, 128, 3)]

    wide = pipeline.SlideSegmenter(fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=16, mpp=1.0)
    assert [wide.step.padded_size(n) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    with pytest.raises(ValueError, match="exceeds"):
        wide.step.dispatch(np.zeros((17, 128, 128, 3), np.uint8))


def test_prefetch_reads_ahead_in_order():
    import threading

    from fseg_jax.wsi.compute import prefetch_batches

    third_batch_started = threading.Event()

    def read(i):
        if i == 4:
            third_batch_started.set()
        if i == 0:  # the first tile finishes only once the third batch is being read
            assert third_batch_started.wait(timeout=30), "the reader did not read ahead"
        return np.full((2, 2, 3), i, np.uint8)

    batches = [[0, 1], [2, 3], [4], [5, 6]]
    out = [(list(ids), tiles[:, 0, 0, 0].tolist()) for ids, tiles, _ in prefetch_batches(batches, read, workers=4)]
    assert out == [(b, b) for b in batches]


def test_multi_process_parts_then_merge(segmenter, slides, tmp_path):
    out = tmp_path / "parts"
    first = segmenter.run(slides["tissue"], out, part=(0, 2))
    assert not first.complete and not (out / "summary.json").exists()
    with pytest.raises(ValueError, match="batches not computed yet"):
        pipeline.merge_slide(out)
    second = segmenter.run(slides["tissue"], out, part=(1, 2))
    assert first.tiles_computed + second.tiles_computed == first.tiles
    summary = pipeline.merge_slide(out)
    reference = segmenter.run(slides["tissue"], tmp_path / "one")
    np.testing.assert_array_equal(_read_labels(out), _read_labels(tmp_path / "one"))
    assert summary["concepts"] == reference.summary["concepts"]


def test_cli_merge_writes_the_outputs_of_all_parts(segmenter, slides, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main

    out = tmp_path / "out" / "tissue"  # the slide's folder under -o, as the command names it
    segmenter.run(slides["tissue"], out, part=(0, 2))
    merge = ["slide", str(slides["tissue"]), "--merge", "-o", str(tmp_path / "out")]
    early = CliRunner().invoke(main, merge)
    assert early.exit_code == 1 and "batches not computed yet" in early.output
    segmenter.run(slides["tissue"], out, part=(1, 2))
    done = CliRunner().invoke(main, merge)
    assert done.exit_code == 0, done.output
    assert "tissue.ome.tif: merged" in done.output
    assert sorted(p.name for p in out.iterdir()) == sorted([*pipeline.OUTPUT_FILES, "weights.safetensors"])


def test_a_folder_goes_on_past_failing_slides(segmenter, slides, tmp_path):
    import shutil

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(slides["tiny"], folder / "a_tiny.ome.tif")
    (folder / "b_corrupt.svs").write_bytes(b"\x00garbage" * 50)
    shutil.copy(slides["no_mpp"], folder / "c_no_mpp.ome.tif")
    (folder / "notes.txt").write_text("not a slide")
    seen = []
    results = pipeline.segment_slides(folder, tmp_path / "out", segmenter, on_result=seen.append)
    assert seen == results and [r.slide.name for r in results] == ["a_tiny.ome.tif", "b_corrupt.svs", "c_no_mpp.ome.tif"]
    ok, corrupt, no_mpp = results
    assert isinstance(ok, pipeline.SlideResult) and ok.complete
    assert (tmp_path / "out" / "a_tiny" / "summary.json").is_file()
    assert isinstance(corrupt, pipeline.SlideFailure) and "not a readable slide" in corrupt.error
    assert isinstance(no_mpp, pipeline.SlideFailure) and "slide_mpp" in no_mpp.error
