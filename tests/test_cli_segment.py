"""`fseg-jax segment` through click's CliRunner, with a small random model saved to disk."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import tiny_config, tiny_vit

from fseg_jax.cli import main
from fseg_jax.cli import segment as cli_segment
from fseg_jax.concepts import ConceptBank, save_concepts
from fseg_jax.hub import save_model

D = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_segment")
    save_model(tiny_vit(tiny_config(patch_size=16, embed_dim=D, depth=2, num_heads=2, reg_tokens=0)), root / "model")
    rng = np.random.default_rng(0)
    concepts = {k: np.abs(rng.standard_normal((k, D))).astype(np.float32) for k in (4, 8)}
    save_concepts(root / "bank.safetensors", ConceptBank(concepts, model="tiny", layer=-1))
    images = root / "images"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(images / "b.jpg")
    return root


def _invoke(*args):
    return CliRunner().invoke(main, ["segment", *map(str, args)])


def test_writes_labels_and_overlays(assets, tmp_path):
    out = tmp_path / "out"
    res = _invoke(assets / "images" / "a.png", assets / "images" / "b.jpg", "--model", assets / "model",
                  "--concepts", assets / "bank.safetensors", "--k", 8, "-o", out, "--no-compilation-cache")
    assert res.exit_code == 0, res.output
    for stem in ("a", "b"):
        labels = np.load(out / f"{stem}_labels.npy")
        assert labels.shape == (40, 56) and labels.dtype == np.int32 and labels.max() < 8
        png = Image.open(out / f"{stem}_labels.png")
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), labels)
        overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert overlay.shape[1:] == (56, 3) and overlay.shape[0] >= 40
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_folder_input_and_dff(assets, tmp_path):
    out = tmp_path / "out"
    res = _invoke(assets / "images", "--model", assets / "model", "--method", "dff", "--k", 3, "-o", out,
                  "--no-compilation-cache", "--no-legend")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "a_labels.npy", "a_labels.png", "a_overlay.png", "b_labels.npy", "b_labels.png", "b_overlay.png"]
    assert np.asarray(Image.open(out / "a_overlay.png")).shape == (40, 56, 3)



def test_bfloat16_option_matches_the_library(assets, tmp_path):
    import jax.numpy as jnp

    from fseg_jax import load_concepts, load_model, segment

    out = tmp_path / "out"
    res = _invoke(assets / "images" / "a.png", "--model", assets / "model", "--concepts", assets / "bank.safetensors",
                  "--k", 8, "--dtype", "bfloat16", "-o", out, "--no-compilation-cache")
    assert res.exit_code == 0, res.output
    image = np.asarray(Image.open(assets / "images" / "a.png"))
    expected = segment(image, load_concepts(assets / "bank.safetensors"), model=load_model(assets / "model"), k=8,
                       dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.load(out / "a_labels.npy"), expected)

def test_method_choices_come_from_the_library_without_importing_jax():
    from fseg_jax.segmentation import METHODS

    (method,) = [p for p in cli_segment.segment.params if p.name == "method"]
    assert tuple(method.type.choices) == METHODS
    # the command's module (imported by `fseg-jax --help` to list it) takes them from a module free of JAX
    probe = "import sys, fseg_jax.cli.segment; print('jax' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


def test_sixteen_bit_label_png(tmp_path):
    labels = np.zeros((5, 6), np.int32)
    labels[2, 3] = 300
    cli_segment.write_outputs(tmp_path, "x", np.zeros((5, 6, 3), np.uint8), labels, alpha=0.5, legend=False)
    png = Image.open(tmp_path / "x_labels.png")
    assert png.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(png), labels)


def test_compilation_cache_default_and_override(assets, tmp_path, monkeypatch):
    used = []
    monkeypatch.setattr(cli_segment, "enable_compilation_cache", lambda d: used.append(str(d)))
    monkeypatch.setenv("FSEG_JAX_CACHE", str(tmp_path / "cache"))
    args = [assets / "images" / "a.png", "--model", assets / "model", "--concepts", assets / "bank.safetensors",
            "--k", 4, "-o", tmp_path / "out"]
    assert _invoke(*args).exit_code == 0
    assert used == [str(tmp_path / "cache" / "jax")]
    assert _invoke(*args, "--compilation-cache", tmp_path / "mine").exit_code == 0
    assert used[-1] == str(tmp_path / "mine")
    assert _invoke(*args, "--no-compilation-cache").exit_code == 0
    assert len(used) == 2


def test_enable_compilation_cache_sets_jax_config(tmp_path):
    import jax

    previous = jax.config.jax_compilation_cache_dir
    try:
        cli_segment.enable_compilation_cache(tmp_path / "jaxcache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jaxcache")
        assert (tmp_path / "jaxcache").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--k", "16"], "available: 4, 8"),
        ([], "--k is required: the bank holds k in 4, 8"),
        (["--k", "4", "--method", "kmeans"], "Invalid value for '--method'"),
        (["--k", "4", "--batch", "0"], "batch must be a positive integer, got 0"),
    ],
)
def test_bad_options(assets, tmp_path, extra, message):
    res = _invoke(assets / "images" / "a.png", "--model", assets / "model", "--concepts",
                  assets / "bank.safetensors", "-o", tmp_path / "out", "--no-compilation-cache", *extra)
    assert res.exit_code != 0 and message in res.output


def test_bad_inputs_exit_with_one_line(assets, tmp_path):
    common = ["--model", assets / "model", "--concepts", assets / "bank.safetensors", "--k", 4, "-o",
              tmp_path / "out", "--no-compilation-cache"]
    res = _invoke(tmp_path / "missing.png", *common)
    assert res.exit_code == 1 and "missing.png: no such file" in res.output
    assert len(res.output.strip().splitlines()) == 1

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a picture")
    res = _invoke(bad, *common)
    assert res.exit_code == 1 and "bad.png" in res.output and "cannot read" in res.output
    assert len(res.output.strip().splitlines()) == 1

    res = _invoke(assets / "images" / "a.png", "--model", tmp_path / "nomodel", "--concepts",
                  assets / "bank.safetensors", "--k", 4, "-o", tmp_path / "out", "--no-compilation-cache")
    assert res.exit_code == 1 and "nomodel' is neither a converted model directory" in res.output

    res = _invoke(assets / "images" / "a.png", "--model", assets / "model", "--k", 4, "-o", tmp_path / "out")
    assert res.exit_code == 2 and "--concepts is required" in res.output

    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(other / "a.png")
    res = _invoke(assets / "images" / "a.png", other / "a.png", *common)
    assert res.exit_code == 1 and "same outputs" in res.output
