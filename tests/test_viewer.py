"""The slide viewer: Deep Zoom geometry against openslide's, the pyramids written for a slide run, resuming a
killed write, the page in headless Chromium (colours where the label map says, labels switched off), and the
`view` command.

Slide runs use test_wsi's stand-in token function, so each takes seconds.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser import Browser, require_chromium
from conftest import ROOT
from PIL import Image
from test_wsi import K, PATCH, standin_token_fn, synthetic_he, write_ome_tiff

from fseg_jax.viewer import DeepZoomGeometry, ViewerError, legend_entries, viewer_address, viewer_server, write_viewer
from fseg_jax.wsi import pipeline
from fseg_jax.wsi.reader import open_slide


def _segmenter(mpp: float) -> pipeline.SlideSegmenter:
    fn, params = standin_token_fn()
    return pipeline.SlideSegmenter(
        fn, params, patch_size=PATCH, k=K, tile=256, margin=16, batch=4, mpp=mpp, info={"model": "standin"}
    )


@pytest.fixture(scope="module")
def svs_run(shared_data, tmp_path_factory):
    """The example SVS segmented at 0.5 um/px (its level 0 as it is: 2220 x 2967 px), with its viewer."""
    out = tmp_path_factory.mktemp("svs") / "cmu_small_region"
    _segmenter(0.5).run(shared_data / "he" / "cmu_small_region.svs", out)
    write_viewer(out)
    return out


@pytest.fixture(scope="module")
def ome_slide(tmp_path_factory):
    """A synthetic pyramidal OME-TIFF (tiffslide reads it), 800 x 600 px at 0.5 um/px."""
    image, _ = synthetic_he(600, 800, seed=1)
    return write_ome_tiff(tmp_path_factory.mktemp("ome") / "tissue.ome.tif", image, mpp=0.5)


def _ome_run(ome_slide: Path, out: Path) -> Path:
    """The synthetic slide segmented at 0.8 um/px: no pyramid level there, so the reader resamples (500 x 375 px)."""
    _segmenter(0.8).run(ome_slide, out)
    return out


def _labels(out: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(out / "labels.ome.tif")


def _tile_files(files: Path, level: int, fmt: str) -> dict[tuple[int, int], Path]:
    out = {}
    for path in (files / str(level)).iterdir():
        col, row = path.stem.split("_")
        assert path.suffix == f".{fmt}"
        out[int(col), int(row)] = path
    return out


# --- geometry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(2220, 2967), (1, 1), (254, 254), (255, 1), (1000, 3), (4097, 513)])
@pytest.mark.parametrize("tile_size, overlap", [(254, 1), (256, 0), (510, 2), (64, 3)])
def test_geometry_matches_openslide_deepzoom(size, tile_size, overlap):
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    g = DeepZoomGeometry(size, tile_size=tile_size, overlap=overlap)
    dz = DeepZoomGenerator(openslide.ImageSlide(Image.new("RGB", size)), tile_size=tile_size, overlap=overlap)
    assert g.level_count == dz.level_count == int(np.ceil(np.log2(max(size)))) + 1
    assert g.level_dimensions == dz.level_dimensions
    assert g.level_tiles == dz.level_tiles
    for level in range(g.level_count):
        w, h = g.level_dimensions[level]
        assert (w, h) == (-(-size[0] // 2 ** (g.max_level - level)), -(-size[1] // 2 ** (g.max_level - level)))
        cols, rows = g.level_tiles[level]
        assert (cols, rows) == (-(-w // tile_size), -(-h // tile_size))
        for col in range(cols):
            for row in range(rows):
                # openslide lets a tile's overlap run past the level's edge when the last tile is narrower than
                # the overlap; OpenSeadragon (which draws the tiles) clips it there, and so do we
                x, y, tw, th = g.tile_box(level, (col, row))
                dw, dh = dz.get_tile_dimensions(level, (col, row))
                assert (tw, th) == (min(dw, w - x), min(dh, h - y))
                if overlap <= 1:
                    assert (tw, th) == (dw, dh)
    assert g.dzi("jpeg").count(f'TileSize="{tile_size}"') == 1


# --- the pyramids -------------------------------------------------------------------------------------


def test_svs_pyramid_is_openslides_deep_zoom(svs_run, shared_data):
    import xml.etree.ElementTree as ET

    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    viewer = svs_run / "viewer"
    manifest = json.loads((viewer / "viewer.json").read_text())
    summary = json.loads((svs_run / "summary.json").read_text())
    assert manifest["slide_tiles"] == "openslide-deepzoom"
    assert manifest["built_from"]["fingerprint"] == summary["fingerprint"]
    assert summary["size"] == [2220, 2967]
    with openslide.OpenSlide(str(shared_data / "he" / "cmu_small_region.svs")) as osr:
        dz = DeepZoomGenerator(osr, tile_size=254, overlap=1, limit_bounds=False)
        ours, theirs = ET.fromstring((viewer / "slide.dzi").read_bytes()), ET.fromstring(dz.get_dzi("jpeg"))
        assert (ours.tag, ours.attrib) == (theirs.tag, theirs.attrib)
        assert [(e.tag, e.attrib) for e in ours] == [(e.tag, e.attrib) for e in theirs]
        for name, fmt in (("slide", "jpeg"), ("labels", "png")):
            files = viewer / f"{name}_files"
            assert sorted(int(p.name) for p in files.iterdir()) == list(range(dz.level_count))
            for level in range(dz.level_count):
                tiles = _tile_files(files, level, fmt)
                cols, rows = dz.level_tiles[level]
                assert sorted(tiles) == [(c, r) for c in range(cols) for r in range(rows)]
                for address, path in tiles.items():
                    with Image.open(path) as img:
                        assert img.size == dz.get_tile_dimensions(level, address)
        # the pixels are openslide's: an inner tile of the full level is its tile saved at the same quality
        top = dz.level_count - 1
        with Image.open(viewer / "slide_files" / str(top) / "3_4.jpeg") as img:
            ours = np.asarray(img.convert("RGB"), np.int16)
        encoded = io.BytesIO()
        dz.get_tile(top, (3, 4)).convert("RGB").save(encoded, format="JPEG", quality=90)
        assert np.abs(ours - np.asarray(Image.open(encoded), np.int16)).max() <= 1
    # label tiles hold the label values: the full level exactly, coarser levels every 2**n-th pixel
    labels = _labels(svs_run)
    g = DeepZoomGeometry((2220, 2967))
    for level, address in ((g.max_level, (3, 4)), (g.max_level, (8, 11)), (g.max_level - 2, (1, 1)), (3, (0, 0))):
        x, y, w, h = g.tile_box(level, address)
        d = g.downsample(level)
        with Image.open(viewer / "labels_files" / str(level) / f"{address[0]}_{address[1]}.png") as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), labels[y * d : (y + h) * d : d, x * d : (x + w) * d : d])


def test_reader_pyramid_of_a_resampled_ome_tiff(ome_slide, tmp_path):
    """A slide that openslide does not read, at a working resolution between pyramid levels: the package's
    reader cuts the tiles, in the same Deep Zoom geometry."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    out = _ome_run(ome_slide, tmp_path / "tissue")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size"] == [500, 375] and summary["backend"] == "tiffslide"
    write_viewer(out, tile_size=128, overlap=2)
    viewer = out / "viewer"
    assert json.loads((viewer / "viewer.json").read_text())["slide_tiles"] == "reader:tiffslide"
    dz = DeepZoomGenerator(openslide.ImageSlide(Image.new("RGB", (500, 375))), tile_size=128, overlap=2)
    for name, fmt in (("slide", "jpeg"), ("labels", "png")):
        for level in range(dz.level_count):
            tiles = _tile_files(viewer / f"{name}_files", level, fmt)
            assert len(tiles) == dz.level_tiles[level][0] * dz.level_tiles[level][1]
            for address, path in tiles.items():
                with Image.open(path) as img:
                    assert img.size == dz.get_tile_dimensions(level, address)
    g = DeepZoomGeometry((500, 375), tile_size=128, overlap=2)
    with open_slide(ome_slide) as s:
        plan = s.plan(0.8)
        x, y, w, h = g.tile_box(g.max_level, (1, 1))
        encoded = io.BytesIO()
        Image.fromarray(s.read(plan, x, y, w, h)).save(encoded, format="JPEG", quality=90)
    with Image.open(viewer / "slide_files" / str(g.max_level) / "1_1.jpeg") as img:
        ours = np.asarray(img.convert("RGB"), np.int16)
    assert np.abs(ours - np.asarray(Image.open(encoded), np.int16)).max() <= 1
    labels = _labels(out)
    with Image.open(viewer / "labels_files" / str(g.max_level) / "1_1.png") as img:
        np.testing.assert_array_equal(np.asarray(img), labels[y : y + h, x : x + w])


def test_a_killed_write_resumes_and_keeps_finished_levels(ome_slide, tmp_path, monkeypatch):
    from fseg_jax.viewer import sources

    out = _ome_run(ome_slide, tmp_path / "tissue")
    g = DeepZoomGeometry((500, 375), tile_size=64)
    killed_at = g.max_level - 2
    original = sources.SlideTiles.level_tiles

    def dies_midway(self, level):
        for i, tile in enumerate(original(self, level)):
            if level == killed_at and i == 1:
                raise KeyboardInterrupt  # the process is killed while writing this level
            yield tile

    monkeypatch.setattr(sources.SlideTiles, "level_tiles", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        write_viewer(out, tile_size=64)
    viewer = out / "viewer"
    files = viewer / "slide_files"
    # the finished levels are in place, the interrupted one only as a temporary, nothing looks complete
    assert {p.name for p in files.iterdir() if not p.name.startswith(".")} == {str(g.max_level), str(g.max_level - 1)}
    assert [p.name for p in files.iterdir() if p.name.startswith(".")] == [f".{killed_at}.{os.getpid()}.tmp"]
    assert not (viewer / "slide.dzi").exists() and not (viewer / "index.html").exists()
    assert not (viewer / "labels_files").exists()
    finished = {p: p.stat().st_mtime_ns for level in (g.max_level, g.max_level - 1) for p in (files / str(level)).iterdir()}
    finished |= {files / str(level): (files / str(level)).stat().st_mtime_ns for level in (g.max_level, g.max_level - 1)}

    stale_page = viewer / ".index.html.99999.tmp.html"  # a page a kill interrupted while it was written
    stale_page.write_text("<html")

    monkeypatch.setattr(sources.SlideTiles, "level_tiles", original)
    write_viewer(out, tile_size=64)
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert not stale_page.exists()
    assert {p.name for p in files.iterdir()} == {str(level) for level in range(g.level_count)}
    assert all(len(list((files / str(level)).iterdir())) == np.prod(g.level_tiles[level]) for level in range(g.level_count))
    assert (viewer / "slide.dzi").read_text() == g.dzi("jpeg") and (viewer / "index.html").is_file()

    # a finished viewer is not written again, not even opened from the slide
    everything = {p: p.stat().st_mtime_ns for p in viewer.rglob("*")}
    monkeypatch.setattr(sources, "SlideTiles", None)
    write_viewer(out, tile_size=64)
    assert {p: p.stat().st_mtime_ns for p in viewer.rglob("*")} == everything


def test_one_process_writes_a_viewer_at_a_time(ome_slide, tmp_path):
    """A writer that finds another one at work on the same viewer folder stops with ViewerError, and leaves
    that writer's files alone; once the other has finished, it writes."""
    import fcntl

    from fseg_jax.viewer.build import LOCK

    out = _ome_run(ome_slide, tmp_path / "tissue")
    viewer = out / "viewer"
    viewer.mkdir()
    level = viewer / "slide_files" / ".9.99999.tmp"  # a level the other writer is writing
    level.mkdir(parents=True)
    other = os.open(viewer / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ViewerError, match=f"^{viewer}: another process is writing this viewer; run again once"):
            write_viewer(out)
        assert sorted(p.relative_to(viewer).as_posix() for p in viewer.rglob("*")) == [
            LOCK, "slide_files", "slide_files/.9.99999.tmp"
        ]
    finally:
        os.close(other)
    assert write_viewer(out).is_file()
    assert not level.exists()


def test_another_run_or_other_settings_rebuild_the_viewer(ome_slide, tmp_path):
    out = _ome_run(ome_slide, tmp_path / "tissue")
    write_viewer(out, quality=80)
    viewer = out / "viewer"
    top = viewer / "slide_files" / str(DeepZoomGeometry((500, 375)).max_level)
    first = top.stat().st_mtime_ns
    write_viewer(out, quality=80)
    assert top.stat().st_mtime_ns == first
    write_viewer(out, quality=70)
    assert json.loads((viewer / "viewer.json").read_text())["built_from"]["quality"] == 70
    second = top.stat().st_mtime_ns
    assert second != first
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "fingerprint": "another run"}))
    write_viewer(out, quality=70)
    assert top.stat().st_mtime_ns != second
    assert json.loads((viewer / "viewer.json").read_text())["built_from"]["fingerprint"] == "another run"


def test_the_legend_lists_classes_when_the_run_has_them_else_concepts():
    concepts = [
        {"label": 1, "concept": 0, "name": "concept 0", "color": [230, 25, 75], "area_mm2": 0.5,
         "share_of_tissue": 0.625, "class": "tumour"},
        {"label": 2, "concept": 1, "name": "concept 1", "color": [60, 180, 75], "area_mm2": 0.3,
         "share_of_tissue": 0.375, "class": "stroma"},
    ]
    assert legend_entries({"concepts": concepts}) == (
        "Concepts",
        [
            {"label": 1, "name": "concept 0", "color": [230, 25, 75], "area_mm2": 0.5, "share_of_tissue": 0.625},
            {"label": 2, "name": "concept 1", "color": [60, 180, 75], "area_mm2": 0.3, "share_of_tissue": 0.375},
        ],
    )
    classes = [
        {"label": 1, "name": "tumour", "color": [200, 0, 0], "concepts": [0], "area_mm2": 0.5, "share_of_tissue": 0.625},
        {"label": 2, "name": "stroma", "color": [0, 0, 200], "concepts": [1], "area_mm2": 0.3, "share_of_tissue": 0.375},
    ]
    assert legend_entries({"concepts": concepts, "classes": classes}) == (
        "Classes",
        [
            {"label": 1, "name": "tumour", "color": [200, 0, 0], "area_mm2": 0.5, "share_of_tissue": 0.625},
            {"label": 2, "name": "stroma", "color": [0, 0, 200], "area_mm2": 0.3, "share_of_tissue": 0.375},
        ],
    )


def test_the_page_holds_the_legend_and_the_title_as_given(ome_slide, tmp_path):
    """Names that look like markup or like the page's placeholders reach the page as they are."""
    from html import escape

    out = _ome_run(ome_slide, tmp_path / "tissue")
    summary = json.loads((out / "summary.json").read_text())
    classes = [
        {"label": 1, "name": "tumour </script>", "color": [200, 0, 0], "area_mm2": 0.1, "share_of_tissue": 0.75},
        {"label": 2, "name": "stroma __TITLE__", "color": [0, 0, 200], "area_mm2": 0.03, "share_of_tissue": 0.25},
    ]
    title = "case <1> __CONFIG__ & __TITLE__.ome.tif"
    (out / "summary.json").write_text(json.dumps({**summary, "slide": f"/moved/{title}", "classes": classes}))
    page = write_viewer(out, slide=ome_slide).read_text()
    assert page.count("<title>") == 1
    assert page.split("<title>")[1].split("</title>")[0] == escape(title)
    config = json.loads(page.split('<script id="config" type="application/json">')[1].split("</script>")[0])
    assert config["title"] == title
    assert config["legend_title"] == "Classes" and config["legend"] == classes
    assert config["mpp"] == summary["mpp"] and config["labels"]["encoding"] == "gray"


def test_bad_folders_are_one_clear_error(ome_slide, tmp_path):
    with pytest.raises(ViewerError, match="no summary.json"):
        write_viewer(tmp_path)
    out = _ome_run(ome_slide, tmp_path / "tissue")
    moved = tmp_path / "elsewhere.ome.tif"
    os.replace(ome_slide, moved)
    try:
        with pytest.raises(ViewerError, match=r"not there; give its current path \(slide=\.\.\., or --slide"):
            write_viewer(out)
        with pytest.raises(ViewerError, match="not the slide the run segmented"):
            write_viewer(out, slide=write_ome_tiff(tmp_path / "other.ome.tif", synthetic_he(300, 300)[0], mpp=0.5))
        broken = tmp_path / "broken.svs"
        broken.write_bytes(b"\x00garbage" * 100)
        with pytest.raises(ViewerError, match="cannot cut the viewer's tiles from the slide: .*not a readable slide"):
            write_viewer(out, slide=broken)
        assert write_viewer(out, slide=moved).is_file()
    finally:
        os.replace(moved, ome_slide)
    (out / "labels.ome.tif").unlink()
    with pytest.raises(ViewerError, match="no labels.ome.tif"):
        write_viewer(out)


def test_a_slide_read_that_fails_is_a_viewer_error(svs_run, ome_slide, tmp_path, monkeypatch):
    """Whatever the slide's library raises while tiles are cut, write_viewer raises ViewerError naming the
    slide and the tile: through openslide's Deep Zoom tiler and through the package's reader."""
    import shutil

    import openslide

    from fseg_jax.wsi.reader import SlideError, TiffSlideSlide

    svs_copy = tmp_path / "svs"
    svs_copy.mkdir()
    for name in ("summary.json", "labels.ome.tif"):
        shutil.copy(svs_run / name, svs_copy / name)

    def read_region(*args, **kwargs):
        raise openslide.OpenSlideError("Cannot read raw tile")

    monkeypatch.setattr(openslide.OpenSlide, "read_region", read_region)
    with pytest.raises(
        ViewerError, match=r"cmu_small_region\.svs: reading tile 0_0 of Deep Zoom level 12 failed "
        r"\(OpenSlideError: Cannot read raw tile\)"
    ) as raised:
        write_viewer(svs_copy)
    assert isinstance(raised.value.__cause__, SlideError)
    assert isinstance(raised.value.__cause__.__cause__, openslide.OpenSlideError)
    assert not (svs_copy / "viewer" / "slide.dzi").exists()

    out = _ome_run(ome_slide, tmp_path / "tissue")

    def read(*args, **kwargs):
        raise RuntimeError("codec failed")

    monkeypatch.setattr(TiffSlideSlide, "_read", read)
    with pytest.raises(ViewerError, match=r"tissue\.ome\.tif: reading tile 0_0 of Deep Zoom level 9 failed "
                       r"\(RuntimeError: codec failed\)"):
        write_viewer(out)


def test_label_tiles_of_a_16_bit_label_map(tmp_path):
    """Label maps with more than 256 labels: red holds the low byte, green the high byte."""
    from fseg_jax.viewer.sources import LabelTiles
    from fseg_jax.wsi.outputs import write_label_tiff
    from fseg_jax.wsi.sampling import array_sampler

    labels = np.random.default_rng(0).integers(0, 700, (300, 1100)).astype(np.uint16)
    write_label_tiff(tmp_path / "labels.ome.tif", array_sampler(labels), size=(1100, 300), dtype=np.uint16, mpp=1.0)
    g = DeepZoomGeometry((1100, 300), tile_size=128, overlap=1)
    with LabelTiles(tmp_path / "labels.ome.tif", g) as tiles:
        assert tiles.encoding == "rg"
        for level in (g.max_level, g.max_level - 1, g.max_level - 3):
            d = g.downsample(level)
            seen = 0
            for col, row, image in tiles.level_tiles(level):
                x, y, w, h = g.tile_box(level, (col, row))
                rgb = np.asarray(image).astype(np.int32)
                assert image.mode == "RGB" and (rgb[..., 2] == 0).all()
                np.testing.assert_array_equal(
                    rgb[..., 0] + 256 * rgb[..., 1], labels[y * d : (y + h) * d : d, x * d : (x + w) * d : d]
                )
                seen += 1
            assert seen == np.prod(g.level_tiles[level])


# --- the page -----------------------------------------------------------------------------------------


def _uniform_points(labels: np.ndarray, value: int, radius: int, n: int, rng) -> np.ndarray:
    """Up to n (x, y) points whose (2 radius + 1)^2 neighbourhood holds only `value`."""
    from scipy.ndimage import maximum_filter, minimum_filter

    size = 2 * radius + 1
    inside = (minimum_filter(labels, size, mode="nearest") == value) & (maximum_filter(labels, size, mode="nearest") == value)
    ys, xs = np.nonzero(inside)
    pick = rng.choice(len(xs), size=min(n, len(xs)), replace=False)
    return np.stack([xs[pick], ys[pick]], axis=1)


def _child_processes() -> set[int]:
    """The processes whose parent is this one (zombies included)."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == os.getpid():
            children.add(int(stat.parent.name))
    return children


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts processes and descriptors through /proc")
def test_a_browser_that_never_answers_times_out_and_is_ended(tmp_path):
    """The page tests' browser driver: a browser that keeps its DevTools pipe open and silent is given up on
    after the timeout, and neither it nor the pipe outlives the failed start."""
    silent = tmp_path / "silent-browser"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")
    silent.chmod(0o755)
    children, descriptors = _child_processes(), len(os.listdir("/proc/self/fd"))
    outcome = []

    def start():
        try:
            Browser(str(silent), timeout=1.0)
        except Exception as err:  # noqa: BLE001 - the outcome is checked below
            outcome.append(err)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "Browser() waited past its timeout"
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert _child_processes() == children
    assert len(os.listdir("/proc/self/fd")) == descriptors


def test_page_shows_the_labels_in_their_colours(svs_run, tmp_path):
    """The overlay blends each label's colour at the given opacity exactly where the label map has it, leaves
    the background alone, and a label switched off (in the URL or by its checkbox) loses its colour."""
    chromium = require_chromium()
    summary = json.loads((svs_run / "summary.json").read_text())
    colours = {c["label"]: np.array(c["color"], np.float32) for c in summary["concepts"]}
    labels = _labels(svs_run)
    rng = np.random.default_rng(0)
    # at the whole-slide view one screen pixel spans ~4 label pixels: sample well inside uniform regions
    points = {v: _uniform_points(labels, v, 16, 12, rng) for v in [0, *colours]}
    present = [v for v in colours if len(points[v]) >= 3]
    assert len(present) >= 3
    hidden_by_url, hidden_by_click = present[0], present[1]

    server = viewer_server(svs_run / "viewer", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = viewer_address(server) + "index.html"
    ready = "document.body.dataset.ready === 'true'"
    try:
        with Browser(chromium, width=1200, height=800) as browser:

            def shoot(name: str, query: str) -> np.ndarray:
                browser.open(f"{url}?{query}")
                browser.wait_for(ready)
                path = tmp_path / f"{name}.png"  # kept with the test's other files, for a look when it fails
                browser.screenshot(path)
                return np.asarray(Image.open(path).convert("RGB"), np.float32)

            shown = shoot("overlay", "opacity=0.6")
            # the controls reflect the state
            assert browser.evaluate("document.getElementById('opacity').value") == "0.6"
            assert browser.evaluate("document.getElementById('overlay').checked") is True
            assert browser.evaluate("[...document.querySelectorAll('#legend li .name')].map(e => e.textContent)") == [
                c["name"] for c in summary["concepts"]
            ]
            # image pixel -> screen pixel, and what the scale bar covers
            flat = np.concatenate([points[v] for v in points]).tolist()
            screen = browser.evaluate(
                "(() => { const v = fsegViewer.viewer, item = v.world.getItemAt(0);"
                " const box = v.element.getBoundingClientRect();"
                f" return {json.dumps(flat)}.map(([x, y]) => {{"
                " const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x + 0.5, y + 0.5));"
                " return [p.x + box.left, p.y + box.top]; }); })()"
            )
            bar = browser.evaluate(
                "(() => { const r = document.getElementById('scalebar').getBoundingClientRect();"
                " return [r.left, r.top, r.right, r.bottom]; })()"
            )
            assert browser.evaluate("document.querySelector('#scalebar .text').textContent").endswith("µm")
            plain = shoot("no_overlay", "opacity=0.6&overlay=0")
            url_hidden = shoot("hidden", f"opacity=0.6&hide={hidden_by_url}")
            browser.evaluate(f"document.getElementById('label-{hidden_by_click}').click()")
            browser.wait_for(ready)
            assert browser.evaluate("document.body.dataset.hidden") == ",".join(
                map(str, sorted([hidden_by_url, hidden_by_click]))
            )
            assert f"hide={min(hidden_by_url, hidden_by_click)},{max(hidden_by_url, hidden_by_click)}" in browser.evaluate(
                "location.search"
            )
            browser.screenshot(tmp_path / "clicked.png")
            clicked = np.asarray(Image.open(tmp_path / "clicked.png").convert("RGB"), np.float32)
            assert not [m for m in browser.console if "rror" in m], browser.console
    finally:
        server.shutdown()
        server.server_close()

    h, w = shown.shape[:2]
    offsets = np.cumsum([0] + [len(points[v]) for v in points])
    checked = 0
    for i, v in enumerate(points):
        for x, y in screen[offsets[i] : offsets[i + 1]]:
            col, row = int(x), int(y)
            if not (0 <= col < w and 0 <= row < h) or (bar[0] - 2 <= x <= bar[2] + 2 and bar[1] - 2 <= y <= bar[3] + 2):
                continue
            base = plain[row, col]
            blended = 0.4 * base + 0.6 * colours[v] if v else base
            np.testing.assert_allclose(shown[row, col], blended, atol=4, err_msg=f"label {v} at ({col}, {row})")
            expect_url = base if v in (0, hidden_by_url) else blended
            np.testing.assert_allclose(url_hidden[row, col], expect_url, atol=4, err_msg=f"label {v}, hidden {hidden_by_url}")
            expect_click = base if v in (0, hidden_by_url, hidden_by_click) else blended
            np.testing.assert_allclose(clicked[row, col], expect_click, atol=4, err_msg=f"label {v}, both hidden")
            checked += v > 0
    assert checked >= 3 * len(present)


# --- the command line ---------------------------------------------------------------------------------


def _cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _first_line(process: subprocess.Popen, *, timeout: float) -> str:
    """The first line `process` prints; kills it and fails the test, with what it wrote on stderr, when it ends
    or `timeout` seconds pass before a line comes."""
    lines = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not lines[0]:
        process.kill()
        pytest.fail(f"the command printed no line within {timeout} s; its stderr: {process.communicate()[1]}")
    return lines[0]


def test_a_command_that_prints_nothing_fails_the_test_and_is_ended():
    silent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('starting', file=sys.stderr, flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    with pytest.raises(pytest.fail.Exception, match="printed no line within 2 s; its stderr: starting"):
        _first_line(silent, timeout=2)
    assert silent.returncode == -signal.SIGKILL


def test_cli_view_serves_the_viewer_and_stops_on_ctrl_c(ome_slide, tmp_path):
    out = _ome_run(ome_slide, tmp_path / "tissue")
    process = subprocess.Popen(
        [sys.executable, "-c", "from fseg_jax.cli import main; main()", "view", str(out), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env(),
    )
    try:
        line = _first_line(process, timeout=120)
        assert line.startswith(f"serving {out / 'viewer'} at http://127.0.0.1:"), line
        address = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(address + "index.html", timeout=10) as reply:
            assert b"openseadragon/openseadragon.min.js" in reply.read()
        with urllib.request.urlopen(address + "slide.dzi", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "application/xml" and b'Width="500"' in reply.read()
        with urllib.request.urlopen(address + "openseadragon/LICENSE.txt", timeout=10) as reply:
            assert b"OpenSeadragon contributors" in reply.read()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
    assert process.returncode == 0, stderr
    assert stdout.strip() == "stopped" and "Traceback" not in stderr


def test_cli_view_errors(ome_slide, tmp_path):
    from click.testing import CliRunner

    from fseg_jax.cli import main

    empty = CliRunner().invoke(main, ["view", str(tmp_path)])
    assert empty.exit_code == 1 and "no summary.json" in empty.output and "Traceback" not in empty.output
    out = _ome_run(ome_slide, tmp_path / "tissue")
    written = CliRunner().invoke(main, ["view", str(out), "--write-only"])
    assert written.exit_code == 0, written.output
    assert written.output.strip() == str(out / "viewer" / "index.html")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = CliRunner().invoke(main, ["view", str(out), "--port", str(port)])
    assert busy.exit_code == 1
    assert busy.output.strip() == f"Error: port {port} on 127.0.0.1 is in use; choose another port"


def test_cli_slide_writes_the_viewers_and_reports_one_that_fails(ome_slide, tmp_path, monkeypatch):
    """A folder of two slides: the first one's viewer fails to read its slide, which is one FAILED line for it;
    the second slide is segmented and its viewer written all the same."""
    import shutil

    import openslide
    from click.testing import CliRunner
    from tiny_models import tiny_vit

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model
    from fseg_jax.viewer import sources

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.ome.tif", "b.ome.tif"):
        shutil.copy(ome_slide, slides / name)
    opened = sources.open_slide

    def a_cannot_be_read(path, **kwargs):  # the viewer's reader only: the segmentation reads the slide as it is
        slide = opened(path, **kwargs)
        if Path(path).name == "a.ome.tif":

            def read(*args):
                raise openslide.OpenSlideError("Cannot read raw tile")

            slide._read = read
        return slide

    monkeypatch.setattr(sources, "open_slide", a_cannot_be_read)
    model = tiny_vit()
    concepts = np.abs(np.random.default_rng(0).normal(size=(3, model.config.embed_dim))).astype(np.float32)
    save_model(model, tmp_path / "model")
    save_concepts(tmp_path / "bank.safetensors", ConceptBank({3: concepts}, model="tiny", layer=-1))
    args = [
        "slide", str(slides), "--model", str(tmp_path / "model"), "--concepts", str(tmp_path / "bank.safetensors"),
        "--mpp", "2", "--tile", "128", "--margin", "16", "--batch", "4", "--no-compilation-cache", "--viewer",
        "-o", str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    failed = [line for line in result.output.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(
        "FAILED viewer of a.ome.tif: cannot cut the viewer's tiles from the slide: "
    ) and failed[0].endswith("failed (OpenSlideError: Cannot read raw tile)"), result.output
    assert (tmp_path / "out" / "a" / "labels.ome.tif").is_file()
    assert not (tmp_path / "out" / "a" / "viewer" / "index.html").exists()
    index = tmp_path / "out" / "b" / "viewer" / "index.html"
    assert f"b.ome.tif: viewer -> {index}" in result.output
    assert index.is_file() and (index.parent / "labels.dzi").is_file()
    assert "1 viewers could not be written" in result.output and "Traceback" not in result.output


def test_cli_slide_reports_any_viewer_error_as_one_line(tmp_path, monkeypatch, capsys):
    import fseg_jax.viewer
    from fseg_jax.cli.slide import _write_viewer

    def write_viewer(out_dir, *, slide):
        raise RuntimeError("the label map's codec\nfailed")

    monkeypatch.setattr(fseg_jax.viewer, "write_viewer", write_viewer)
    assert _write_viewer(tmp_path / "a.svs", tmp_path / "a") is False
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "FAILED viewer of a.svs: RuntimeError: the label map's codec failed\n"


def test_the_page_and_openseadragon_ship_as_package_data():
    import tomllib
    from importlib import resources

    from fseg_jax.viewer import build

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in ("index.html", *build._STATIC):
        folder, _, file = f"static/{name}".rpartition("/")
        package = "fseg_jax.viewer." + folder.replace("/", ".")
        assert package in setuptools["packages"] and file in setuptools["package-data"][package]
        assert (resources.files("fseg_jax.viewer") / "static" / name).is_file()
