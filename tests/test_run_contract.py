"""One run description behind every front end: the same options, the same defaults, the same refusals.

The options and their defaults come from ``fseg_jax.options.RUN_DEFAULTS`` (what ``Pipeline.create`` takes), so a
new option fails these tests until every front end, library and command line, takes it with its default and a
bad value for it is listed here.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny_config, tiny_vit

from fseg_jax.options import DTYPES, METHODS, RUN_DEFAULTS, SLIDE_DEFAULTS, SOLVERS


def _front_ends():
    from fseg_jax.atlas import concept_atlas
    from fseg_jax.segmentation import Pipeline, make_token_fn, segment
    from fseg_jax.wsi.pipeline import SlideSegmenter, segment_slide

    return {
        "Pipeline.create": Pipeline.create,
        "segment": segment,
        "make_token_fn": make_token_fn,
        "segment_slide": segment_slide,
        "SlideSegmenter.from_model": SlideSegmenter.from_model,
        "concept_atlas": concept_atlas,
    }


# one bad value per run option, and the one message every front end gives for it
BAD = {
    "k": ("4", "k must be a positive integer, got '4'"),
    "method": ("kmeans", "unknown method 'kmeans'; choose one of project, nearest, factorize, dff"),
    "layer": (1.0, "layer must be an int or a non-empty list of ints, got 1.0"),
    "n_components": (0, "n_components must be a positive integer, got 0"),
    "seed": (-1, "seed must be an integer >= 0, got -1"),
    "solver": ("lbfgs", "solver 'lbfgs' does not apply to method 'project' (solvers: admm, hals, mu)"),
    "tol": (float("nan"), "tol must be a finite number >= 0, got nan"),
    "max_iter": (2.5, "max_iter must be a positive integer, got 2.5"),
    "dtype": ("float16", "unknown dtype 'float16'; choose one of float32, bfloat16"),
    "bucket": (0, "bucket must be a positive integer, got 0"),
    "batch": (-1, "batch must be a positive integer, got -1"),
    "random_init": (-3, "random_init must be an integer >= 0, got -3"),
    "depth": (2, "depth=2 applies to random-weight models only: pass random_init= (a seed) too"),
}
MORE_BAD = [
    ("k", 4.7, "k must be a positive integer, got 4.7"),
    ("k", True, "k must be a positive integer, got True"),
    ("layer", [True], "layer must be an int or a non-empty list of ints, got [True]"),
    ("layer", [], "layer must be an int or a non-empty list of ints, got []"),
    ("batch", 0, "batch must be a positive integer, got 0"),
]


def test_every_run_option_has_a_bad_value_here():
    assert set(BAD) == set(RUN_DEFAULTS)


@pytest.mark.parametrize("front_end", list(_front_ends()))
def test_every_front_end_takes_the_run_options_with_their_defaults(front_end):
    """Each option is a parameter with the description's default, or goes untouched through ``**options``."""
    params = inspect.signature(_front_ends()[front_end]).parameters
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name, default in RUN_DEFAULTS.items():
        if name in params:
            assert params[name].default == default, (front_end, name)
        else:
            assert forwards, f"{front_end} takes no {name!r}"
    for name, default in SLIDE_DEFAULTS.items():
        if name in params:
            assert params[name].default == default, (front_end, name)


def _call(front_end: str, **options):
    concepts = np.ones((3, 8), np.float32)
    fn = _front_ends()[front_end]
    if front_end == "Pipeline.create":
        return fn(concepts, **options)
    if front_end == "segment":
        return fn(np.zeros((16, 16, 3), np.uint8), concepts, **options)
    if front_end in ("make_token_fn", "SlideSegmenter.from_model"):
        return fn("uni", concepts, **options)
    if front_end == "segment_slide":
        return fn("no-such-slide.svs", "out", concepts, **options)
    return fn([np.zeros((16, 16, 3), np.uint8)], concepts, **options)


@pytest.mark.parametrize("front_end", list(_front_ends()))
@pytest.mark.parametrize("name,value,message", [(n, v, m) for n, (v, m) in BAD.items()] + MORE_BAD)
def test_every_front_end_refuses_a_bad_value_with_one_message(front_end, name, value, message):
    """Checked before anything is loaded or read (the model "uni" is never fetched, the slide never opened)."""
    with pytest.raises(ValueError) as err:
        _call(front_end, **{name: value})
    assert str(err.value) == message


def _cli_params(*names):
    from fseg_jax.cli import main

    import click

    command = main
    for name in names:
        command = command.get_command(click.Context(command), name)
    return {p.name: p for p in command.params}


@pytest.mark.parametrize("command", [("segment",), ("slide",), ("concepts", "atlas")])
def test_the_command_line_offers_every_run_option_with_its_default(command):
    params = _cli_params(*command)
    for name, default in RUN_DEFAULTS.items():
        assert name in params, f"{' '.join(command)} has no option for {name!r}"
        given = params[name].default
        if name == "layer":
            assert params[name].multiple and tuple(given) == (default,)
        else:
            assert given == default, (command, name)
    methods = params["method"].type.choices
    assert tuple(methods) == (METHODS if command != ("concepts", "atlas") else ("project",))
    assert tuple(params["solver"].type.choices) == SOLVERS and tuple(params["dtype"].type.choices) == DTYPES
    if command == ("slide",):
        for name, default in SLIDE_DEFAULTS.items():
            assert params[name].default == default, name


@pytest.mark.parametrize("command", ["segment", "slide"])
@pytest.mark.parametrize("option,value,name", [
    ("--k", "0", "k"), ("--n-components", "0", "n_components"), ("--seed", "-1", "seed"), ("--batch", "0", "batch"),
    ("--max-iter", "0", "max_iter"), ("--bucket", "0", "bucket"), ("--random-init", "-3", "random_init"),
])
def test_the_command_line_refuses_a_bad_value_with_the_librarys_message(tmp_path, command, option, value, name):
    from fseg_jax.cli import main

    from fseg_jax.concepts import ConceptBank, save_concepts

    bank = tmp_path / "bank.safetensors"
    save_concepts(bank, ConceptBank({3: np.ones((3, 8), np.float32)}, model="uni"))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    args = [command, str(image), "--concepts", str(bank), "--no-compilation-cache", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, [*args, option, value])
    library = {**{n: m for n, (_, m) in BAD.items()}, "k": "k must be a positive integer, got 0",
               "seed": "seed must be an integer >= 0, got -1", "batch": "batch must be a positive integer, got 0",
               "max_iter": "max_iter must be a positive integer, got 0"}
    with pytest.raises(ValueError) as err:
        _call("Pipeline.create", **{name: int(value)})
    assert str(err.value) == library[name]
    assert result.exit_code == 1 and result.output.strip() == f"Error: {library[name]}", result.output


def test_dff_needs_no_more_components_than_tokens_and_features_in_every_path(tmp_path):
    from fseg_jax.segmentation import Pipeline, segment
    from fseg_jax.wsi.pipeline import SlideSegmenter

    model = tiny_vit(tiny_config(patch_size=16))  # width 32, patch 16
    d = model.config.embed_dim
    with pytest.raises(ValueError, match=rf"k={d + 1} NMF components exceed min\(tokens, feature dimension\)"):
        Pipeline.create(None, model=model, method="dff", k=d + 1)
    image = np.zeros((32, 48, 3), np.uint8)  # 2 x 3 = 6 tokens
    message = r"k=7 NMF components exceed min\(tokens, feature dimension\) = min\(6, 32\) for image 0 \(32 x 48 px\)"
    with pytest.raises(ValueError, match=message):
        segment(image, model=model, method="dff", k=7)
    assert segment(image, model=model, method="dff", k=6).labels.shape == (32, 48)
    with pytest.raises(ValueError, match=r"n_components=7 NMF components exceed .* = min\(6, 32\)"):
        segment(image, np.ones((3, d), np.float32), model=model, method="factorize", n_components=7)
    pipeline = Pipeline.create(None, model=model, method="dff", k=20)
    with pytest.raises(ValueError, match=r"min\(16, 32\) for a tile of 64 px"):
        SlideSegmenter.from_pipeline(pipeline, tile=64, margin=16)


def test_slide_mpp_that_contradicts_the_file_is_refused_unless_forced(tmp_path):
    from test_wsi import synthetic_he, write_ome_tiff

    from fseg_jax.wsi import open_slide

    image, _ = synthetic_he(64, 64, seed=1)
    path = write_ome_tiff(tmp_path / "s.ome.tif", image, mpp=0.5, levels=1)
    with open_slide(path, slide_mpp=0.9) as slide:  # within 2x of the file's 0.5: the given one holds
        assert slide.mpp == 0.9 and slide.file_mpp == 0.5
    with pytest.raises(ValueError, match=r"slide_mpp 50 contradicts the 0.5 um/px the file records \(100.0x apart\)"):
        open_slide(path, slide_mpp=50)
    with open_slide(path, slide_mpp=50, force_slide_mpp=True) as slide:
        assert slide.mpp == 50

    from click.testing import CliRunner

    from fseg_jax.cli import main
    from fseg_jax.concepts import ConceptBank, save_concepts

    bank = ConceptBank({3: np.ones((3, 768), np.float32)}, model="kaiko_vitb16-random")
    save_concepts(tmp_path / "bank.safetensors", bank)
    # the command reports the slide, one line, before any of its tiles is read
    cli = CliRunner().invoke(main, ["slide", str(path), "--concepts", str(tmp_path / "bank.safetensors"),
                                    "--random-init", "0", "--depth", "1", "--slide-mpp", "50",
                                    "--no-compilation-cache", "-o", str(tmp_path / "out")])
    assert cli.exit_code == 1
    assert "FAILED s.ome.tif: " + f"{path}: slide_mpp 50 contradicts the 0.5 um/px the file records" in cli.output
    for bad in (0, -1, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="slide_mpp must be a finite number > 0"):
            open_slide(path, slide_mpp=bad)


@pytest.mark.parametrize("name,value", [("mpp", float("inf")), ("mpp", 0), ("tile", 0), ("tile", 64.0),
                                        ("margin", -16), ("devices", [])])
def test_slide_options_are_checked_before_any_slide_is_read(name, value):
    from fseg_jax.segmentation import Pipeline
    from fseg_jax.wsi.pipeline import SlideSegmenter

    pipeline = Pipeline.create(np.ones((3, 32), np.float32), model=tiny_vit(tiny_config()))
    with pytest.raises(ValueError, match=name):
        SlideSegmenter.from_pipeline(pipeline, **{name: value})


def test_segment_slide_and_the_slide_command_take_the_model_the_bank_records_random_ones_included(tmp_path):
    """A bank built with a random-weight model records `<preset>-random`; every front end rebuilds that model
    from random_init and depth, and refuses the bank without them."""
    from fseg_jax.cli import main
    from fseg_jax.concepts import build_concepts, save_concepts
    from fseg_jax.hub import random_model
    from fseg_jax.segmentation import Pipeline
    from fseg_jax.wsi.pipeline import segment_slide

    from test_wsi import synthetic_he

    image, _ = synthetic_he(96, 128, seed=3)
    model = random_model("kaiko_vits16", seed=0, depth=1)
    bank = build_concepts(model, [image], ks=(3,), per_token=True, tile=64)
    assert bank.model == "kaiko_vits16-random"
    save_concepts(tmp_path / "bank.safetensors", bank)
    with pytest.raises(ValueError, match="made with a random-weight model, 'kaiko_vits16-random': pass random_init="):
        Pipeline.create(bank)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "tile.png")
    result = segment_slide(tmp_path / "tile.png", tmp_path / "lib", bank, random_init=0, depth=1, slide_mpp=1.0,
                           mpp=1.0, tile=64, margin=16, batch=2)
    assert result.summary["model"] == "kaiko_vits16-random"
    from fseg_jax.wsi.pipeline import SlideSegmenter

    assert SlideSegmenter.from_model(None, bank, random_init=0, depth=1, tile=64).info["model"] == "kaiko_vits16-random"
    cli = CliRunner().invoke(main, [
        "slide", str(tmp_path / "tile.png"), "--concepts", str(tmp_path / "bank.safetensors"), "--random-init", "0",
        "--depth", "1", "--slide-mpp", "1", "--mpp", "1", "--tile", "64", "--margin", "16", "--batch", "2",
        "--layer", "-1", "--layer", "0", "--no-compilation-cache", "-o", str(tmp_path / "cli"),
    ])
    # two layers make a 768-wide feature the 384-wide bank does not match: refused with one line, not loaded
    assert cli.exit_code == 1 and "has feature dimension 384, but model kaiko_vits16-random gives 768" in cli.output
    cli = CliRunner().invoke(main, [
        "slide", str(tmp_path / "tile.png"), "--concepts", str(tmp_path / "bank.safetensors"), "--random-init", "0",
        "--depth", "1", "--slide-mpp", "1", "--mpp", "1", "--tile", "64", "--margin", "16", "--batch", "2",
        "--no-compilation-cache", "-o", str(tmp_path / "cli"),
    ])
    assert cli.exit_code == 0, cli.output
    summary = json.loads((tmp_path / "cli" / "tile" / "summary.json").read_text())
    assert summary["model"] == "kaiko_vits16-random" and summary["concepts"] == result.summary["concepts"]


def test_devices_alpha_and_strict_json_are_checked_before_any_output(tmp_path):
    from PIL import Image

    import fseg_jax
    from fseg_jax.cli import main
    from fseg_jax.wsi.outputs import write_json

    model = tiny_vit(tiny_config(patch_size=16))
    with pytest.raises(ValueError, match="devices must name at least one device, got an empty list"):
        fseg_jax.segment(np.zeros((16, 16, 3), np.uint8), np.ones((3, 32), np.float32), model=model, devices=[])
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 5"):
        fseg_jax.overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), alpha=5)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["segment", str(tmp_path / "a.png"), "--concepts", "uni", "--alpha", "5",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "alpha must be a number in [0, 1], got 5.0" in result.output
    assert not (tmp_path / "out").exists()  # refused before any label file is written
    with pytest.raises(ValueError):
        write_json(tmp_path / "summary.json", {"area_mm2": float("inf")})
    assert list(tmp_path.iterdir()) == [tmp_path / "a.png"]


def test_the_slide_command_runs_dff_as_segment_slide_does(tmp_path):
    """`fseg-jax slide --method dff` (no bank) writes what `segment_slide(method="dff")` writes."""
    import tifffile
    from PIL import Image

    from fseg_jax.cli import main
    from fseg_jax.hub import save_model
    from fseg_jax.wsi.pipeline import segment_slide

    from test_wsi import synthetic_he

    save_model(tiny_vit(tiny_config(patch_size=16)), tmp_path / "model")
    image, _ = synthetic_he(96, 128, seed=5)
    Image.fromarray(image).save(tmp_path / "tile.png")
    settings = dict(method="dff", k=3, seed=1, slide_mpp=1.0, mpp=1.0, tile=64, margin=16, batch=2)
    result = segment_slide(tmp_path / "tile.png", tmp_path / "lib", model=str(tmp_path / "model"), **settings)
    assert result.summary["method"] == "dff" and result.summary["bank"] is None
    cli = CliRunner().invoke(main, [
        "slide", str(tmp_path / "tile.png"), "--model", str(tmp_path / "model"), "--method", "dff", "--k", "3",
        "--seed", "1", "--slide-mpp", "1", "--mpp", "1", "--tile", "64", "--margin", "16", "--batch", "2",
        "--no-compilation-cache", "-o", str(tmp_path / "cli"),
    ])
    assert cli.exit_code == 0, cli.output
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "cli" / "tile" / "labels.ome.tif"),
                                  tifffile.imread(tmp_path / "lib" / "labels.ome.tif"))
    assert len(np.unique(tifffile.imread(tmp_path / "lib" / "labels.ome.tif"))) > 1
