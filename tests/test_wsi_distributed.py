"""Several processes share one slide's tiles (`fseg-jax slide --coordinator ... --process-id ...`), then --merge.

Two real processes join a jax.distributed run on 127.0.0.1 (CPU); their merged outputs must equal a
one-process run. Bad input fails with one clear error and leaves nothing counted as done.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fseg_jax.cli import main
from fseg_jax.wsi import pipeline
from fseg_jax.wsi.store import WorkDir, work_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ViT and a one-k bank saved to disk, and a synthetic slide of 6 tiles at 1 um/px."""
    from test_wsi import synthetic_he, write_ome_tiff
    from test_wsi_model import K, uni_tiny_config
    from tiny_models import tiny_vit

    from fseg_jax.concepts import ConceptBank, save_concepts
    from fseg_jax.hub import save_model

    root = tmp_path_factory.mktemp("distributed")
    save_model(tiny_vit(uni_tiny_config()), root / "model")
    concepts = np.abs(np.random.default_rng(0).normal(size=(K, 64))).astype(np.float32)
    save_concepts(root / "bank.safetensors", ConceptBank({K: concepts}, model="uni-tiny", layer=-1))
    image, _ = synthetic_he(600, 800, seed=1)
    slide = write_ome_tiff(root / "tissue.ome.tif", image, mpp=0.5)
    # no --k: the bank holds one
    args = ["slide", str(slide), "--model", str(root / "model"), "--concepts", str(root / "bank.safetensors"),
            "--mpp", "1", "--tile", "128", "--margin", "16", "--batch", "2", "--no-compilation-cache"]
    return root, slide, args


def _process(args: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    code = "import sys; from fseg_jax.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def _outputs(folder: Path) -> dict:
    import tifffile

    summary = json.loads((folder / "summary.json").read_text())
    return {
        "labels": tifffile.imread(folder / "labels.ome.tif"),
        "geojson": json.loads((folder / "labels.geojson").read_text()),
        "concepts": summary["concepts"],
        "tiles": summary["tiles"],
    }


def test_two_processes_then_merge_equal_one_process(setup, tmp_path):
    root, slide, args = setup
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _process([*args, "--coordinator", address, "--num-processes", "2", "--process-id", str(i),
                  "--coordinator-timeout", "120"], tmp_path / "parts")
        for i in (1, 0)  # the coordinator last: the other process waits for it
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
        assert "share done" in stdout, stdout
    folder = tmp_path / "parts" / "tissue"
    assert not (folder / "summary.json").exists()
    plan = WorkDir(folder).read_plan()
    assert len(plan["batches"]) == 3 and WorkDir(folder).done(work_fingerprint(plan)) == {0, 1, 2}

    merged = CliRunner().invoke(main, ["slide", str(slide), "--merge", "-o", str(tmp_path / "parts")])
    assert merged.exit_code == 0, merged.output
    single = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    a, b = _outputs(folder), _outputs(tmp_path / "one" / "tissue")
    np.testing.assert_array_equal(a["labels"], b["labels"])
    assert a["geojson"] == b["geojson"] and a["concepts"] == b["concepts"] and a["tiles"] == b["tiles"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(pipeline.OUTPUT_FILES)


def test_unreachable_coordinator_is_one_clear_error(setup, tmp_path):
    _, _, args = setup
    address = f"127.0.0.1:{_free_port()}"  # nothing serves there
    proc = _process([*args, "--coordinator", address, "--num-processes", "2", "--process-id", "1",
                     "--coordinator-timeout", "2"], tmp_path / "out")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert f"cannot reach the coordinator at {address} within 2 s" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"], "2 is out of range for 2 processes"),
    (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "-1"], "out of range"),
    (["--coordinator", "127.0.0.1:1"], "go together"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "1"], "expected HOST:PORT"),
])
def test_bad_process_options_are_usage_errors(setup, tmp_path, extra, message):
    _, _, args = setup
    result = CliRunner().invoke(main, [*args, *extra, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_processes_with_other_settings_are_refused(setup, tmp_path):
    """The work folder records the settings: a second process with another margin is refused, and its
    batches never count towards the first run's."""
    from test_wsi import standin_token_fn

    _, slide, _ = setup
    fn, params = standin_token_fn()
    first = pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=16, batch=2, mpp=1.0)
    other = pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=32, batch=2, mpp=1.0)
    out = tmp_path / "s"
    first.run(slide, out, part=(0, 2))
    work = WorkDir(out)
    plan = work.read_plan()
    done = work.done(plan["fingerprint"])
    assert done == {0, 2}
    with pytest.raises(pipeline.SlideRunMismatch, match=r"margin: 16 there, 32 here"):
        other.run(slide, out, part=(1, 2))
    assert work.read_plan() == plan and work.done(plan["fingerprint"]) == done  # untouched
    with pytest.raises(ValueError, match="1 of 3 batches not computed yet"):
        pipeline.merge_slide(out)
    assert not (out / "summary.json").exists()
    # a batch written under other settings (by a process that raced the plan) is not counted as done
    (work.path / f"batch-000001.{'0' * 12}.npz").write_bytes(b"other settings")
    assert work.done(plan["fingerprint"]) == done
    first.run(slide, out, part=(1, 2))
    assert pipeline.merge_slide(out)["tiles"]["tissue"] == 6
