"""Misuse of the command line (every command but `slide`) and of the functions behind it: each bad input or
failing environment gets one line naming the file or option and what to do, the documented exit status
(2 usage, 1 failed input, 130 Ctrl-C), and leaves each input's outputs complete or absent.

Full disks and read-only folders are small tmpfs mounts, which need root: elsewhere those tests skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT
from PIL import Image
from tiny_models import tiny_config, tiny_vit

import fseg_jax
from fseg_jax.cli import main
from fseg_jax.cli.segment import OUTPUT_SUFFIXES
from fseg_jax.concepts import ConceptBank, save_concepts
from fseg_jax.hub import save_model

D = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny model folder, a bank that records it, and a folder of three small images."""
    root = tmp_path_factory.mktemp("misuse")
    model_dir = save_model(tiny_vit(tiny_config(patch_size=16, embed_dim=D, depth=1, num_heads=2)), root / "model")
    rng = np.random.default_rng(0)
    save_concepts(root / "bank.safetensors",
                  ConceptBank({4: np.abs(rng.standard_normal((4, D))).astype(np.float32)}, model=str(model_dir)))
    images = root / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(images / f"{name}.png")
    return root


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _segment(assets, *args):
    return _cli("segment", *args, "--concepts", assets / "bank.safetensors", "--no-compilation-cache")


def _error_line(result) -> str:
    """The output of a failed command, checked to be one line and no traceback."""
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return lines[0]


def _stems_done(out: Path, stems) -> set[str]:
    """The stems whose three outputs are in `out`; fails on a stem with some but not all, or a temporary."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    assert not [n for n in names if n.startswith(".")], names  # no temporaries left
    done = set()
    for stem in stems:
        have = {f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES} & names
        assert len(have) in (0, len(OUTPUT_SUFFIXES)), f"{stem}: only {sorted(have)}"
        if have:
            done.add(stem)
    return done


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    """A tmpfs mounted at `where` (root only; the test skips otherwise), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs (a full or read-only disk) needs root")
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


# --- segment --------------------------------------------------------------------------------------------


def test_segment_alpha_out_of_range_is_refused_before_any_work(assets, tmp_path):
    result = _segment(assets, assets / "images", "-o", tmp_path / "out", "--alpha", 5)
    assert result.exit_code == 2 and "Invalid value for --alpha: alpha must be a number in [0, 1], got 5.0" in result.output
    assert not (tmp_path / "out").exists()


def test_segment_folder_reports_each_bad_file_and_goes_on(assets, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(assets / "images", folder)
    (folder / "bad.png").write_bytes(b"not a picture")
    whole = (folder / "a.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    result = _segment(assets, folder, "-o", out, "--batch", 2)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert f"FAILED cannot read {folder / 'bad.png'} as an image (format not recognised)" in lines
    assert f"FAILED cannot read {folder / 'cut.png'}: image file is truncated" in "\n".join(lines)
    assert lines[-1] == "Error: 2 of 5 images failed (listed above); they have no outputs"
    assert _stems_done(out, ["a", "b", "c", "bad", "cut"]) == {"a", "b", "c"}


def test_segment_of_one_unreadable_image_is_one_line(assets, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    result = _segment(assets, bad, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: cannot read {bad} as an image (format not recognised)"
    assert _stems_done(tmp_path / "out", ["bad"]) == set()


def test_empty_input_folders_are_errors(assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = _segment(assets, empty, "-o", tmp_path / "out")
    assert result.exit_code == 1 and _error_line(result).startswith(f"Error: {empty}: folder holds no images")
    result = _cli("concepts", "build", assets / "model", empty, "--k", 2, "-o", tmp_path / "bank.safetensors")
    assert result.exit_code == 1 and f"no image files (.png, .jpg" in _error_line(result) and str(empty) in result.output
    result = _cli("concepts", "atlas", empty, "--concepts", assets / "bank.safetensors", "-o", tmp_path / "a.png")
    assert result.exit_code == 1 and f"{empty}: folder holds no images" in _error_line(result)
    result = _cli("evaluate", empty, empty)
    assert result.exit_code == 1 and f"no label maps in {empty}" in _error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no output folder, bank, atlas or report


def test_output_below_an_existing_file(assets, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = _segment(assets, assets / "images" / "a.png", "-o", blocker / "out")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {blocker / 'out'}: not a directory; a part of this path is a file, not a folder"
    pred = tmp_path / "p.npy"
    np.save(pred, np.zeros((2, 2), np.int64))
    result = _cli("evaluate", pred, pred, "-o", blocker / "report.json")
    assert result.exit_code == 1 and _error_line(result).startswith(f"Error: {blocker}: file exists")
    result = _cli("concepts", "atlas", assets / "images", "--concepts", assets / "bank.safetensors",
                  "-o", blocker / "atlas.png")
    assert result.exit_code == 1 and _error_line(result).startswith(f"Error: {blocker}")
    assert blocker.read_text() == "a file, not a folder"


def test_read_only_output_folder(assets, tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        result = _segment(assets, assets / "images" / "a.png", "-o", ro)
        assert result.exit_code == 1
        assert _error_line(result) == f"Error: {ro / 'a_labels.png'}: read-only file system; write elsewhere"
        assert list(ro.iterdir()) == []


def test_full_disk_leaves_every_image_complete_or_absent(assets, tmp_path):
    with _tmpfs(tmp_path / "disk", "size=24k") as disk:
        out = disk / "out"
        result = _segment(assets, assets / "images", "-o", out, "--batch", 1)
        assert result.exit_code == 1
        line = _error_line(result)
        assert line.startswith(f"Error: {out}{os.sep}") and ".tmp" not in line
        assert line.endswith(": no space left on device; free some space or write elsewhere")
        done = _stems_done(out, ["a", "b", "c"])
        assert len(done) < 3  # the disk filled up before the last image


def test_a_short_write_on_a_full_disk_names_the_target(tmp_path):
    """numpy reports a full disk as "N requested and M written", with no errno and no file name."""
    from fseg_jax._files import atomic_paths

    with _tmpfs(tmp_path / "disk", "size=16k") as disk:
        with pytest.raises(OSError) as caught:
            with atomic_paths(disk / "small.npy", disk / "big.npy") as (small, big):
                np.save(small, np.zeros(10))
                np.save(big, np.zeros(100_000))
        assert caught.value.errno == 28 and caught.value.filename == str(disk / "big.npy")
        assert list(disk.iterdir()) == []


def test_an_output_that_cannot_be_written_leaves_none_of_its_image(assets, tmp_path):
    out = tmp_path / "out"
    (out / "b_overlay.png").mkdir(parents=True)  # b's labels are written, then its overlay cannot be
    result = _segment(assets, assets / "images", "-o", out, "--batch", 1)
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {out / 'b_overlay.png'}: is a directory; give a file, not a folder"
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.npy", "a_labels.png", "a_overlay.png", "b_overlay.png"]


def test_ctrl_c_of_a_folder_run(assets, tmp_path):
    """SIGINT while `segment` works through a folder: exit 130, one line, every image complete or absent."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    stems = [f"im{i:03d}" for i in range(150)]
    for stem in stems:
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    out = tmp_path / "out"
    command = [sys.executable, "-c", "from fseg_jax.cli import main; main()", "segment", str(folder),
               "--concepts", str(assets / "bank.safetensors"), "--batch", "1", "--no-compilation-cache",
               "-o", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out.is_dir() and any(p.name.endswith("_overlay.png") for p in out.iterdir())):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == "Error: interrupted (Ctrl-C)"
    done = _stems_done(out, stems)
    assert 0 < len(done) < len(stems)


# --- evaluate -------------------------------------------------------------------------------------------


def _masks(tmp_path: Path, target: np.ndarray) -> Path:
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(target.astype(np.uint8)).save(masks / "a.png")
    return masks


def test_evaluate_refuses_float_maps_as_the_library_does(tmp_path):
    target = np.random.default_rng(0).integers(0, 3, (8, 8))
    masks = _masks(tmp_path, target)
    preds = tmp_path / "preds"
    preds.mkdir()
    np.save(preds / "a_labels.npy", target.astype(np.float32) / 3)
    result = _cli("evaluate", preds, masks)
    assert result.exit_code == 1
    assert _error_line(result) == (f"Error: {preds / 'a_labels.npy'} holds float32 values; label maps are integers "
                                   "(0, 1, 2, ...)")
    with pytest.raises(TypeError, match="must be integers"):
        fseg_jax.evaluate(target.astype(np.float32) / 3, target)


def test_evaluate_pairs_what_segment_writes(assets, tmp_path):
    out = tmp_path / "out"
    assert _segment(assets, assets / "images", "-o", out).exit_code == 0
    masks = tmp_path / "masks"
    masks.mkdir()
    for stem in ("a", "b", "c"):
        shutil.copy(out / f"{stem}_labels.png", masks / f"{stem}.png")
    result = _cli("evaluate", out, masks, "-o", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    assert "3 pair(s)" in result.output and "mIoU 1.0000" in result.output
    pairs = json.loads((tmp_path / "report.json").read_text())["pairs"]
    assert [Path(p).name for p, _ in pairs] == ["a_labels.npy", "b_labels.npy", "c_labels.npy"]


def test_evaluate_says_when_a_value_looks_like_an_ignore_label(tmp_path):
    target = np.zeros((10, 10), np.uint8)
    target[:, 5:] = 1
    target[:2] = 255  # 20% unlabelled
    pred = np.where(target == 255, 0, target).astype(np.int64)
    masks = _masks(tmp_path, target)
    preds = tmp_path / "preds"
    preds.mkdir()
    np.save(preds / "a_labels.npy", pred)
    result = CliRunner().invoke(main, ["evaluate", str(preds), str(masks)])
    assert result.exit_code == 0
    assert result.stderr.strip() == (
        "warning: target value 255 covers 20% of the pixels, far above the other classes (0..1), and is scored as a "
        "class of its own; if it marks unlabelled pixels, leave it out with ignore_index=255 (--ignore-index 255)"
    )
    ignored = CliRunner().invoke(main, ["evaluate", str(preds), str(masks), "--ignore-index", "255"])
    assert ignored.exit_code == 0 and ignored.stderr == "" and "mIoU 1.0000" in ignored.stdout
    with pytest.warns(UserWarning, match="target value 255 covers 20%"):
        fseg_jax.evaluate(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fseg_jax.evaluate(pred, np.where(target == 255, 2, target))  # classes 0, 1, 2: nothing to say


def test_evaluate_refuses_a_set_with_no_scored_pixel(tmp_path):
    target = np.full((4, 4), 255, np.uint8)
    masks = _masks(tmp_path, target)
    preds = tmp_path / "preds"
    preds.mkdir()
    np.save(preds / "a_labels.npy", np.zeros((4, 4), np.int64))
    result = _cli("evaluate", preds, masks, "--ignore-index", 255, "-o", tmp_path / "report.json")
    assert result.exit_code == 1
    assert _error_line(result) == "Error: no pixel to score: every target pixel equals ignore_index=255"
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(ValueError, match="no pixel to score"):
        fseg_jax.evaluate(np.zeros((4, 4), int), target, ignore_index=255)


def test_evaluate_colour_masks_are_one_clear_error(tmp_path):
    labels = np.zeros((6, 7), np.int64)
    with pytest.raises(ValueError, match=r"the target is an \(H, W, 3\) colour image; evaluate takes \(H, W\) integer"):
        fseg_jax.evaluate(labels, np.zeros((6, 7, 3), np.uint8))
    pred = tmp_path / "pred.npy"
    np.save(pred, labels)
    rgb = tmp_path / "mask.png"
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).save(rgb)
    result = _cli("evaluate", pred, rgb)
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {rgb} is a RGB image; save label maps as indices (palette or grayscale)"


def test_evaluate_of_paths_says_to_read_them(tmp_path):
    with pytest.raises(TypeError, match="prediction 0: evaluate takes label maps as arrays, got the path 'a.png'"):
        fseg_jax.evaluate("a.png", np.zeros((2, 2), int))
    with pytest.raises(TypeError, match="target 1: evaluate takes label maps as arrays, got the path"):
        fseg_jax.evaluate([np.zeros((2, 2), int)] * 2, [np.zeros((2, 2), int), tmp_path / "b.png"])


def test_evaluate_writes_its_report_into_a_new_folder(tmp_path):
    pred = tmp_path / "pred.npy"
    np.save(pred, np.array([[0, 1], [1, 0]]))
    report = tmp_path / "new" / "folder" / "report.json"
    result = _cli("evaluate", pred, pred, "-o", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["miou"] == 1.0
    assert [p.name for p in report.parent.iterdir()] == ["report.json"]


# --- convert, concepts, save_model -----------------------------------------------------------------------


def test_convert_a_timm_config_that_is_not_json(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("architecture: vit_small")
    result = _cli("convert", "--timm-config", config, "--random-init", 0, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert _error_line(result).startswith(f"Error: {config} is not a JSON file (Expecting value")
    config.write_text("[1, 2]")
    result = _cli("convert", "--timm-config", config, "--random-init", 0, "-o", tmp_path / "out")
    assert _error_line(result) == f"Error: {config} holds a JSON list, not an object; give a timm config.json"
    assert not (tmp_path / "out").exists()


def test_convert_output_below_a_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "vit_small_patch16_224",
                                  "model_args": {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}}))
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = _cli("convert", "--timm-config", config, "--random-init", 0, "-o", blocker / "model")
    assert result.exit_code == 1
    assert _error_line(result) == f"Error: {blocker / 'model'}: not a directory; a part of this path is a file, not a folder"
    assert _cli("convert", "--timm-config", config, "--random-init", 0, "-o", tmp_path / "model").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]


def test_save_model_of_something_else_writes_nothing(tmp_path):
    with pytest.raises(TypeError, match="save_model takes a VisionTransformer or ResNet50, got object"):
        save_model(object(), tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_concepts_import_refuses_an_unknown_preset(tmp_path):
    source = tmp_path / "bank.joblib"
    source.write_bytes(b"never read")
    result = _cli("concepts", "import", source, "--preset", "nosuch", "--trust-pickle", "-o", tmp_path / "b.safetensors")
    assert result.exit_code == 2 and "Invalid value for '--preset': unknown preset 'nosuch'; choose one of" in result.output
    assert "uni" in result.output and not (tmp_path / "b.safetensors").exists()


def test_concepts_build_names_a_truncated_image(assets, tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(assets / "images", folder)
    whole = (folder / "b.png").read_bytes()
    (folder / "b.png").write_bytes(whole[: len(whole) // 2])
    result = _cli("concepts", "build", assets / "model", folder, "--k", 2, "--tile", 16, "-o", tmp_path / "k.safetensors")
    assert result.exit_code == 1
    assert _error_line(result).startswith(f"Error: cannot read {folder / 'b.png'}: image file is truncated")
    assert not (tmp_path / "k.safetensors").exists()


# --- concept_atlas takes what build_concepts takes -------------------------------------------------------


def test_concept_atlas_takes_folders_paths_arrays_batches_and_lists(tmp_path):
    rng = np.random.default_rng(2)
    model = tiny_vit()
    bank = rng.uniform(0, 1, (4, 32)).astype(np.float32)
    images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(2)]
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i}.png")

    def atlas(images):
        return fseg_jax.concept_atlas(images, bank, model=model, n=3, patch=8)

    def same(a, b):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.weights, b.weights)
        np.testing.assert_array_equal(a.sources, b.sources)
        np.testing.assert_array_equal(a.patches, b.patches)

    both, first = atlas(images), atlas(images[:1])
    same(atlas(str(folder)), both)
    same(atlas(folder), both)
    same(atlas(np.stack(images)), both)
    same(atlas([folder]), both)
    same(atlas(str(folder / "0.png")), first)
    same(atlas(images[0]), first)  # one (H, W, 3) array is one image, not H one-row images
    assert first.tokens == 3 * 4
    with pytest.raises(ValueError, match=f"no image files .* in folder {tmp_path / 'empty'}"):
        (tmp_path / "empty").mkdir()
        atlas(tmp_path / "empty")


# --- view -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """A finished slide run made from relative paths (the stand-in token function of test_wsi: seconds)."""
    from test_wsi import K, PATCH, standin_token_fn, synthetic_he, write_ome_tiff

    from fseg_jax.wsi import pipeline

    root = tmp_path_factory.mktemp("run")
    image, _ = synthetic_he(300, 400, seed=1)
    write_ome_tiff(root / "tissue.ome.tif", image, mpp=0.5)
    fn, params = standin_token_fn()
    segmenter = pipeline.SlideSegmenter(fn, params, patch_size=PATCH, k=K, tile=128, margin=16, batch=4, mpp=1.0,
                                        info={"model": "standin"})
    here = os.getcwd()
    os.chdir(root)
    try:
        segmenter.run("tissue.ome.tif", Path("out") / "tissue")
    finally:
        os.chdir(here)
    return root / "out" / "tissue"


def test_view_from_another_folder_finds_the_slide(slide_run, tmp_path, monkeypatch):
    summary = json.loads((slide_run / "summary.json").read_text())
    assert summary["slide"] == str((slide_run.parent.parent / "tissue.ome.tif").resolve())
    monkeypatch.chdir(tmp_path)
    out = shutil.copytree(slide_run, tmp_path / "copy")
    result = _cli("view", out, "--write-only")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "viewer" / "index.html")


def test_summary_records_the_bank_by_absolute_path(tmp_path, monkeypatch):
    from test_wsi import synthetic_he, write_ome_tiff

    from fseg_jax.wsi import pipeline

    image, _ = synthetic_he(128, 160, seed=2)
    write_ome_tiff(tmp_path / "s.ome.tif", image, mpp=0.5)
    rng = np.random.default_rng(3)
    save_concepts(tmp_path / "bank.safetensors", ConceptBank({4: rng.uniform(0, 1, (4, D)).astype(np.float32)}))
    monkeypatch.chdir(tmp_path)
    model = tiny_vit(tiny_config(patch_size=16, embed_dim=D, depth=1, num_heads=2))
    segmenter = pipeline.SlideSegmenter.from_model(model, "bank.safetensors", k=4, tile=128, margin=16, batch=2, mpp=1.0)
    segmenter.run("s.ome.tif", "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["bank"] == str((tmp_path / "bank.safetensors").resolve())
    assert summary["slide"] == str((tmp_path / "s.ome.tif").resolve())


def test_view_port_out_of_range(slide_run):
    result = _cli("view", slide_run, "--port", 70000)
    assert result.exit_code == 2 and "Invalid value for '--port': 70000 is not in the range 0<=x<=65535" in result.output


@pytest.mark.parametrize("content, message", [
    ("{", "summary.json is not valid JSON (Expecting property name"),
    ('{"size": [1, 2]}', "summary.json is not a slide run's summary (no fingerprint, slide, target_mpp, slide_mpp, "
                         "concepts); run the slide again"),
])
def test_view_names_a_damaged_summary(slide_run, tmp_path, content, message):
    out = shutil.copytree(slide_run, tmp_path / "copy")
    (out / "summary.json").write_text(content)
    result = _cli("view", out, "--write-only")
    assert result.exit_code == 1 and _error_line(result).startswith(f"Error: {out}{os.sep}{message}")


def test_view_names_a_damaged_label_map(slide_run, tmp_path):
    out = shutil.copytree(slide_run, tmp_path / "copy")
    labels = out / "labels.ome.tif"
    labels.write_bytes(b"II*\0" + b"\0" * 12)
    result = _cli("view", out, "--write-only")
    assert result.exit_code == 1
    line = _error_line(result)
    assert line.startswith(f"Error: {labels}: cannot read the label map (") and line.endswith(
        "; run the slide again to rewrite it")
