"""README.md's first command, run the way a new user runs it: in an empty folder with no ../shared beside it,
offline, with a fresh compilation cache (the `pip install -e .` part is skipped: the package is installed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def first_bash_block() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip()


def test_first_command_installs_then_segments_the_packaged_sample(tmp_path):
    command = first_bash_block()
    assert "\n" not in command, "the first block is one command"
    assert command.startswith("pip install -e . && ")
    assert "../shared" not in command and "http" not in command
    work = tmp_path / "clone"  # nothing beside it: a fresh clone has no ../shared
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", FSEG_JAX_CACHE=str(tmp_path / "cache"),
               HF_HOME=str(tmp_path / "hf"), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    t0 = time.perf_counter()
    run = subprocess.run(["bash", "-c", command.removeprefix("pip install -e . && ")], cwd=work, env=env,
                         capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout + run.stderr
    labels = np.load(work / "demo" / "he_sample_labels.npy")
    assert labels.shape == (512, 640) and labels.dtype == np.int32 and 1 < len(np.unique(labels)) <= 8
    np.testing.assert_array_equal(np.asarray(Image.open(work / "demo" / "he_sample_labels.png")), labels)
    assert np.asarray(Image.open(work / "demo" / "he_sample_overlay.png")).shape[1:] == (640, 3)
    assert (work / "demo" / "bank.safetensors").is_file()
    assert not (tmp_path / "hf").exists()  # nothing fetched from the hub
    print(f"README first command: {seconds:.1f} s")


def test_packaged_sample():
    from fseg_jax.data import sample_image, sample_image_path

    image = sample_image()
    assert image.shape == (512, 640, 3) and image.dtype == np.uint8
    image[:] = 0  # a new array each call: the next caller gets the picture again
    assert sample_image().std() > 10
    assert sample_image_path().stat().st_size <= 300_000
    assert "CC0 1.0" in (sample_image_path().parent / "README.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"fseg_jax.data"' in pyproject and '"fseg_jax.data" = ["*.jpg", "README.md"]' in pyproject
