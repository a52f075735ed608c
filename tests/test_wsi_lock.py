"""A slide run owns its folder: a second run there is refused (or waits), nothing of another run is lost
without a word, and the output folders of one run are distinct."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_wsi_distributed import _assert_same_outputs, _process, setup  # noqa: F401 - setup is a fixture

from fseg_jax.cli import main
from fseg_jax.wsi import pipeline
from fseg_jax.wsi.lock import LOCK_NAME, FolderBusy, hold_folder
from fseg_jax.wsi.store import WorkDir


def test_a_held_folder_is_refused_to_another_thread_with_its_holder(tmp_path):
    folder = tmp_path / "slide"
    errors = []
    with hold_folder(folder, role="process 1 of 4"):
        with hold_folder(folder):  # re-entrant in the holding thread
            pass
        assert (folder / LOCK_NAME).is_file()

        def other():
            try:
                with hold_folder(folder):
                    pass
            except FolderBusy as err:
                errors.append(str(err))

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1
    assert errors[0].startswith(f"{folder} is in use by another run (pid {os.getpid()} on {socket.gethostname()}, "
                                "process 1 of 4, since ")
    assert errors[0].endswith("run again once it has finished, or pass --wait (wait=True) to wait for it")
    assert not folder.exists()  # a clean release of a folder it made, left empty, leaves nothing behind
    folder.mkdir()
    with hold_folder(folder):  # free again
        (folder / "output").write_text("kept")
    assert [p.name for p in folder.iterdir()] == ["output"]


def test_wait_takes_the_folder_when_its_holder_lets_go(tmp_path):
    folder = tmp_path / "slide"
    order = []
    holding = threading.Event()

    def first():
        with hold_folder(folder):
            holding.set()
            time.sleep(0.5)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    holding.wait()
    with hold_folder(folder, wait=True):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]


def test_a_new_label_map_never_truncates_one_still_mapped(tmp_path):
    work = WorkDir(tmp_path)
    old = work.label_map((64, 64), np.uint8)
    old[:] = 7
    old.flush()
    new = work.label_map((8, 8), np.uint8)  # another size: the old file would be cut short
    assert int(np.asarray(old).sum()) == 7 * 64 * 64 and not np.asarray(new).any()


def test_a_run_with_other_settings_says_what_it_discards(tmp_path):
    from test_wsi import synthetic_he, write_ome_tiff
    from test_wsi import standin_token_fn

    image, _ = synthetic_he(600, 800, seed=1)
    slide = write_ome_tiff(tmp_path / "tissue.ome.tif", image, mpp=0.5)
    fn, params = standin_token_fn()
    first = pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=16, batch=2, mpp=1.0)
    other = pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=32, batch=2, mpp=1.0)
    out = tmp_path / "out"
    first.run(slide, out, part=(0, 2))  # a killed run's work: 2 of 3 batches
    result = other.run(slide, out)
    assert result.complete and result.replaced.startswith(
        "discarded the unfinished work of a run with other settings (margin: 16 there, 32 here"
    )
    assert result.replaced.endswith("; 2 of 3 batches computed)")
    again = first.run(slide, out)
    assert again.replaced == "replaces the finished outputs of a run with other settings"
    assert first.run(slide, out).replaced is None  # its own outputs: already done


# --- two runs on one output folder ------------------------------------------------------------------------


def _stopped_once_holding(args: list[str], out: Path) -> tuple:
    """A slide run started and stopped (SIGSTOP) as soon as it holds the slide's folder."""
    proc = _process(args, out)
    lock = out / "tissue" / LOCK_NAME
    deadline = time.monotonic() + 300
    while not (lock.is_file() and b'"pid"' in lock.read_bytes()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)
    return proc, lock


def test_a_second_run_on_the_same_output_is_refused_and_the_first_completes(setup, tmp_path):
    _, _, args = setup
    first, _ = _stopped_once_holding(args, tmp_path / "out")
    try:
        work_before = sorted(p.name for p in (tmp_path / "out" / "tissue").rglob("*"))
        for extra in ([], ["--margin", "32"]):  # the same settings, or others that would replace its work
            second = CliRunner().invoke(main, [*args, *extra, "-o", str(tmp_path / "out")])
            assert second.exit_code == 1, second.output
            assert (f"FAILED tissue.ome.tif: {tmp_path / 'out' / 'tissue'} is in use by another run "
                    f"(pid {first.pid} on {socket.gethostname()}, since ") in second.output
            assert sorted(p.name for p in (tmp_path / "out" / "tissue").rglob("*")) == work_before
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    reference = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "one")])
    assert reference.exit_code == 0, reference.output
    _assert_same_outputs(tmp_path / "out" / "tissue", tmp_path / "one" / "tissue")
    assert sorted(p.name for p in (tmp_path / "out" / "tissue").iterdir()) == sorted(pipeline.OUTPUT_FILES)


def test_wait_runs_after_the_first_run(setup, tmp_path):
    _, _, args = setup
    first, lock = _stopped_once_holding(args, tmp_path / "out")
    try:
        second = _process([*args, "--wait"], tmp_path / "out")
        deadline = time.monotonic() + 300
        fds = Path(f"/proc/{second.pid}/fd")
        while not any(os.path.realpath(fd) == str(lock) for fd in _links(fds)):  # it opened the lock: waiting
            assert second.poll() is None and time.monotonic() < deadline, second.communicate()[1][-3000:]
            time.sleep(0.05)
        assert second.poll() is None and not (tmp_path / "out" / "tissue" / "summary.json").exists()
    finally:
        first.send_signal(signal.SIGCONT)
    for proc in (first, second):
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    assert "tissue.ome.tif: 6 tissue tiles, already done" in stdout


def _links(folder: Path) -> list[str]:
    try:
        return [str(p) for p in folder.iterdir()]
    except OSError:
        return []


# --- the slides of one run --------------------------------------------------------------------------------


def test_two_slides_with_one_name_are_refused_naming_both(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("cmu.svs", "cmu.tif"):
        (folder / name).write_bytes(b"")
    result = CliRunner().invoke(main, ["slide", str(folder), "--concepts", "x.safetensors", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {folder / 'cmu.svs'} and {folder / 'cmu.tif'} would both write {tmp_path / 'o' / 'cmu'}: rename "
        "one, or segment them into separate output folders"
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="cmu.svs is listed twice"):
        pipeline.slide_out_dirs([folder / "cmu.svs", folder / "cmu.svs"], tmp_path / "o")
    with pytest.raises(ValueError, match="would both write"):  # as on a case-insensitive file system
        pipeline.slide_out_dirs([folder / "CMU.svs", folder / "cmu.tif"], tmp_path / "o")


def test_a_folder_without_slides_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no slide here")
    result = CliRunner().invoke(main, ["slide", str(tmp_path / "empty"), "--concepts", "x", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'empty'}: the folder holds no slide or image (" in result.output
    assert not (tmp_path / "o").exists()
