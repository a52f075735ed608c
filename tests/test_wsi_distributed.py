"""Several processes share a folder of slides (`fseg-jax slide --coordinator ... --process-id ...`).

Real processes join a jax.distributed run on 127.0.0.1 (CPU): each slide is computed and written by one of
them (a slide too large for one is split, and written by one), their outputs equal a one-process run's, and
a killed run completes when run again. Bad input fails with one clear error and leaves nothing counted as
done. `assign_slides`, the assignment every process computes, is tested on its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fseg_jax.cli import main
from fseg_jax.wsi import pipeline
from fseg_jax.wsi.cohort import assign_slides
from fseg_jax.wsi.store import WorkDir, work_fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny ViT and a one-k bank saved to disk; a synthetic slide of 6 tissue tiles at 1 um/px, a folder of
    four such slides (6 to 10 tissue tiles) and a folder of one large slide (more tiles than the others together)
    and three small."""
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
    (root / "four").mkdir()
    (root / "mixed").mkdir()
    for i in range(4):
        small, _ = synthetic_he(600, 800, seed=10 + i)
        write_ome_tiff(root / "four" / f"s{i}.ome.tif", small, mpp=0.5)
        if i:
            write_ome_tiff(root / "mixed" / f"small{i}.ome.tif", small, mpp=0.5)
    large, _ = synthetic_he(2000, 2400, seed=2, blobs=6)
    write_ome_tiff(root / "mixed" / "large.ome.tif", large, mpp=0.5)
    # no --k: the bank holds one
    args = ["--model", str(root / "model"), "--concepts", str(root / "bank.safetensors"),
            "--mpp", "1", "--tile", "128", "--margin", "16", "--batch", "2", "--no-compilation-cache"]
    return root, slide, ["slide", str(slide), *args]


def _process(args: list[str], out: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)
    code = "import sys; from fseg_jax.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args, "-o", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def _run_processes(args: list[str], out: Path, n: int = 2) -> list[tuple[int, str, str]]:
    """(exit code, stdout, stderr) of each of `n` processes run together on `args`, by process id."""
    procs = _start_processes(args, out, n)
    outputs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def _run_all_done(args: list[str], out: Path) -> list[tuple[int, str, str]]:
    """`_run_processes` on a folder of four slides, every process exiting 0 and reporting all four done."""
    runs = _run_processes(args, out)
    for code, stdout, stderr in runs:
        assert code == 0, stderr[-3000:]
        assert "all processes: 4 of 4 slides done" in stdout, stdout
    return runs


def _start_processes(args: list[str], out: Path, n: int = 2) -> list[subprocess.Popen]:
    """`n` processes of one run, by process id (the coordinator started last: the others wait for it)."""
    address = f"127.0.0.1:{_free_port()}"
    procs = {
        i: _process([*args, "--coordinator", address, "--num-processes", str(n), "--process-id", str(i),
                     "--coordinator-timeout", "120"], out)
        for i in range(n - 1, -1, -1)
    }
    return [procs[i] for i in range(n)]


def _outputs(folder: Path) -> dict:
    import tifffile

    summary = json.loads((folder / "summary.json").read_text())
    return {
        "labels": tifffile.imread(folder / "labels.ome.tif"),
        "geojson": json.loads((folder / "labels.geojson").read_text()),
        "concepts": summary["concepts"],
        "tiles": summary["tiles"],
    }


def _assert_same_outputs(a: Path, b: Path) -> None:
    x, y = _outputs(a), _outputs(b)
    np.testing.assert_array_equal(x["labels"], y["labels"])
    assert x["geojson"] == y["geojson"] and x["concepts"] == y["concepts"] and x["tiles"] == y["tiles"]


def _computed_by(folder: Path) -> dict[int, int]:
    """{process index: tiles} as the slide's summary.json records who computed its tiles."""
    by: dict[int, int] = {}
    for entry in json.loads((folder / "summary.json").read_text())["computed_by"]:
        by[entry["process"]] = by.get(entry["process"], 0) + entry["tiles"]
    return by


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """One-process runs of the folders, the reference for the multi-process ones."""
    root, _, args = setup
    out = tmp_path_factory.mktemp("one")
    for name in ("four", "mixed"):
        result = CliRunner().invoke(main, [args[0], str(root / name), *args[2:], "-o", str(out / name)])
        assert result.exit_code == 0, result.output
    return out


def test_four_slides_two_processes_each_slide_written_by_one(setup, one_process, tmp_path):
    root, _, args = setup
    runs = _run_all_done([args[0], str(root / "four"), *args[2:]], tmp_path)
    owners, tiles = [], []
    for i in range(4):
        folder = tmp_path / f"s{i}"
        assert sorted(p.name for p in folder.iterdir()) == sorted(pipeline.OUTPUT_FILES)  # no --merge run
        _assert_same_outputs(folder, one_process / "four" / f"s{i}")
        tiles.append(_outputs(folder)["tiles"]["tissue"])
        by = _computed_by(folder)
        assert len(by) == 1 and sum(by.values()) == tiles[-1]  # every tile by one process
        owners.append(next(iter(by)))
        # the process that wrote it is the one that reported it
        assert f"s{i}.ome.tif: {tiles[-1]} tissue tiles, {tiles[-1]} tiles computed" in runs[owners[-1]][1]
    # as the assignment deals them: by tiles (batches of 2), longest first, none split
    expected = assign_slides([_slide(t, 2) for t in tiles], 2)
    assert owners == [next(i for i, us in enumerate(expected.units) if s in {u.slide for u in us}) for s in range(4)]
    assert set(owners) == {0, 1} and not expected.mergers


def test_one_large_slide_is_split_and_the_small_ones_are_not(setup, one_process, tmp_path):
    root, _, args = setup
    runs = _run_all_done([args[0], str(root / "mixed"), *args[2:]], tmp_path)
    for name in ("large", "small1", "small2", "small3"):
        _assert_same_outputs(tmp_path / name, one_process / "mixed" / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(pipeline.OUTPUT_FILES)
    large = _computed_by(tmp_path / "large")
    assert sorted(large) == [0, 1] and sum(large.values()) == _outputs(tmp_path / "large")["tiles"]["tissue"]
    # its outputs are written by one process, which reports it; each process reports its part
    lines = [line for _, out, _ in runs for line in out.splitlines() if line.startswith("large.ome.tif: ")]
    assert sum("part computed" in line for line in lines) == 2
    assert sum("tissue tiles" in line for line in lines) == 1, lines
    for name in ("small1", "small2", "small3"):
        assert len(_computed_by(tmp_path / name)) == 1


def test_a_killed_process_is_completed_by_a_rerun(setup, one_process, tmp_path):
    """Process 1 is killed as soon as a batch is computed (jax.distributed then ends the others: here the
    test ends process 0 at once); the same command run again completes every slide and computes no tile twice."""
    root, _, args = setup
    command = [args[0], str(root / "four"), *args[2:]]
    procs = _start_processes(command, tmp_path)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*/.fseg-work/batch-*.npz")) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].communicate()[1][-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    finished = {p.parent.name for p in tmp_path.glob("*/summary.json")}
    assert len(finished) < 4

    runs = _run_all_done(command, tmp_path)
    for i in range(4):
        folder = tmp_path / f"s{i}"
        _assert_same_outputs(folder, one_process / "four" / f"s{i}")
        assert sum(_computed_by(folder).values()) == _outputs(folder)["tiles"]["tissue"]  # no tile computed twice
        assert sorted(p.name for p in folder.iterdir()) == sorted(pipeline.OUTPUT_FILES)
    for name in finished:  # done before the kill: not run again
        lines = [line for _, out, _ in runs for line in out.splitlines() if line.startswith(f"{name}.ome.tif: ")]
        assert len(lines) == 1 and ", already done," in lines[0], lines


def test_a_run_of_an_older_version_is_merged_by_merge(setup, tmp_path):
    """`--merge` writes the outputs of a run whose processes each computed a share of every slide."""
    root, slide, args = setup
    segmenter = pipeline.SlideSegmenter.from_model(
        str(root / "model"), str(root / "bank.safetensors"), mpp=1.0, tile=128, margin=16, batch=2
    )
    for i in range(2):
        assert not segmenter.run(slide, tmp_path / "parts" / "tissue", part=(i, 2)).complete
    merged = CliRunner().invoke(main, ["slide", str(slide), "--merge", "-o", str(tmp_path / "parts")])
    assert merged.exit_code == 0, merged.output
    single = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    _assert_same_outputs(tmp_path / "parts" / "tissue", tmp_path / "one" / "tissue")


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


def test_processes_with_other_options_stop_before_any_work(setup, tmp_path):
    root, _, args = setup
    command = [args[0], str(root / "four"), *args[2:]]
    address = f"127.0.0.1:{_free_port()}"
    procs = [
        _process([*command, "--coordinator", address, "--num-processes", "2", "--process-id", str(i),
                  "--coordinator-timeout", "120", *extra], tmp_path)
        for i, extra in ((1, ["--margin", "32"]), (0, []))
    ]
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 1, stderr[-3000:]
        assert "the processes of this run use different settings (margin: 16 on process 0, 32 on process 1)" in stderr
    assert not any(tmp_path.glob("*/.fseg-work")) and not any(tmp_path.glob("*/summary.json"))


# --- the assignment ---------------------------------------------------------------------------------------


def _slide(tiles: int, batch: int = 16) -> dict[int, int]:
    """{batch index: tiles} of a slide with `tiles` tissue tiles in batches of `batch`."""
    return {b: min(batch, tiles - b * batch) for b in range(-(-tiles // batch))}


def test_assignment_balances_work_longest_first_and_splits_nothing_that_fits():
    rng = np.random.default_rng(0)
    slides = [_slide(int(t)) for t in rng.lognormal(np.log(2000), 0.8, 400)]
    a = assign_slides(slides, 8)
    units = [u for us in a.units for u in us]
    assert sorted(u.slide for u in units) == list(range(400)) and not a.mergers  # every slide once, none split
    total = sum(sum(s.values()) for s in slides)
    assert max(a.loads()) <= total / 8 * 1.01
    for us in a.units:  # each process runs its slides longest first
        assert [u.work for u in us] == sorted((u.work for u in us), reverse=True)
    assert assign_slides(slides, 8) == a  # deterministic


def test_assignment_splits_a_slide_that_would_keep_processes_idle():
    slides = [_slide(2000), _slide(100), _slide(120), _slide(90)]
    a = assign_slides(slides, 4)
    parts = sorted((u.part, u.parts, i) for i, us in enumerate(a.units) for u in us if u.slide == 0)
    assert [p[:2] for p in parts] == [(p, 4) for p in range(4)]
    assert sorted(p[2] for p in parts) == [0, 1, 2, 3]  # one part per process
    # the parts are every 4th batch, and together the whole slide
    assert sum(u.work for us in a.units for u in us if u.slide == 0) == 2000
    # merged by the holder of its lightest part, which runs its part first, then the merge, then whole slides
    part_work = {i: u.work for i, us in enumerate(a.units) for u in us if u.slide == 0}
    assert a.mergers == {0: min(part_work, key=lambda i: (part_work[i], i))}
    assert all(us[0].slide == 0 for us in a.units)
    # the other slides stay whole
    assert sorted((u.slide, u.parts) for us in a.units for u in us if u.slide) == [(1, 1), (2, 1), (3, 1)]


def test_assignment_follows_what_is_left():
    """A re-run assigns the work left: a slide with most batches done weighs what it has left."""
    full = [_slide(320), _slide(320), _slide(320)]
    resumed = [{b: t for b, t in full[0].items() if b >= 18}, full[1], full[2]]  # 18 of 20 batches done
    a = assign_slides(resumed, 2)
    assert sorted(a.loads()) == [320, 352]
    assert [u for us in a.units for u in us if u.slide == 0][0].work == 32
    assert assign_slides([{}, _slide(16)], 2).loads() == [16, 1]  # nothing left but its outputs: weight 1


# --- the cohort run in one process: threads standing in for processes ----------------------------------------


class _ThreadProcesses:
    """Processes whose members are threads of this process: a dict for the store, a threading.Barrier."""

    def __init__(self, count: int):
        import threading

        self.count = count
        self.store: dict[str, str] = {}
        self.changed = threading.Condition()
        self.barrier = threading.Barrier(count, timeout=300)

    def member(self, index: int):
        from fseg_jax.wsi.cohort import Processes

        shared = self

        class Member(Processes):
            def barrier(self, name: str) -> None:
                shared.barrier.wait()

            def publish(self, key: str, value: str) -> None:
                with shared.changed:
                    shared.store[key] = value
                    shared.changed.notify_all()

            def read(self, key: str) -> str:
                with shared.changed:
                    assert shared.changed.wait_for(lambda: key in shared.store, timeout=300), key
                    return shared.store[key]

            def read_all(self, prefix: str) -> dict[str, str]:
                with shared.changed:
                    return {k: v for k, v in shared.store.items() if k.startswith(prefix)}

        return Member(index, self.count)


def test_a_failing_slide_is_reported_once_by_its_process_and_the_others_go_on(tmp_path):
    import threading

    from test_wsi import standin_token_fn, synthetic_he, write_ome_tiff

    folder = tmp_path / "slides"
    folder.mkdir()
    for i, (h, w) in enumerate([(600, 800), (600, 800), (2000, 2400)]):
        image, _ = synthetic_he(h, w, seed=20 + i, blobs=6 if h > 1000 else 3)
        write_ome_tiff(folder / f"s{i}.ome.tif", image, mpp=0.5)
    (folder / "broken.svs").write_bytes(b"not a slide")
    fn, params = standin_token_fn()
    group = _ThreadProcesses(2)
    results, reported, errors = {}, {0: [], 1: []}, []

    def member(i: int) -> None:
        segmenter = pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=16, batch=2, mpp=1.0)
        try:
            results[i] = pipeline.segment_slides(
                folder, tmp_path / "out", segmenter, processes=group.member(i), on_result=reported[i].append
            )
        except Exception as err:  # noqa: BLE001 - shown by the assertion below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    def view(rs):
        return [(r.slide.name, type(r).__name__, r.process, getattr(r, "error", None)) for r in rs]

    assert view(results[0]) == view(results[1])  # every process ends with the same view
    names = [p.name for p in pipeline.find_slides(folder)]
    broken = results[0][names.index("broken.svs")]
    assert isinstance(broken, pipeline.SlideFailure) and broken.process == names.index("broken.svs") % 2
    finals = [(i, r) for i in (0, 1) for r in reported[i] if isinstance(r, pipeline.SlideFailure) or r.complete]
    assert sorted(r.slide.name for _, r in finals) == sorted(names)  # each slide reported once
    assert all(r.process == i for i, r in finals)  # by the process that ran it
    one = pipeline.segment_slides(
        [folder / f"s{i}.ome.tif" for i in range(3)], tmp_path / "one",
        pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=16, batch=2, mpp=1.0),
    )
    for r in one:
        _assert_same_outputs(tmp_path / "out" / r.out_dir.name, r.out_dir)
    large = _computed_by(tmp_path / "out" / "s2")  # the large slide was split over both
    assert sorted(large) == [0, 1]


def test_a_run_with_another_number_of_processes_resumes_what_is_left(tmp_path):
    """A two-process run killed with one slide half done and one finished: three processes complete it,
    computing only the batches left and rewriting nothing finished."""
    import threading

    from test_wsi import standin_token_fn, synthetic_he, write_ome_tiff

    folder = tmp_path / "slides"
    folder.mkdir()
    for i in range(3):
        image, _ = synthetic_he(600, 800, seed=30 + i)
        write_ome_tiff(folder / f"s{i}.ome.tif", image, mpp=0.5)
    fn, params = standin_token_fn()

    def segmenter():
        return pipeline.SlideSegmenter(fn, params, patch_size=16, k=4, tile=128, margin=16, batch=2, mpp=1.0)

    out = tmp_path / "out"
    segmenter().run(folder / "s0.ome.tif", out / "s0", part=(0, 2), process=(1, 2))  # half of s0's batches
    finished = segmenter().run(folder / "s1.ome.tif", out / "s1", process=(0, 2))
    plan = WorkDir(out / "s0").read_plan()
    half = sum(len(plan["batches"][b]) for b in WorkDir(out / "s0").done(work_fingerprint(plan)))
    group = _ThreadProcesses(3)
    results = {}

    def member(i: int) -> None:
        try:
            results[i] = pipeline.segment_slides(folder, out, segmenter(), processes=group.member(i))
        except BaseException:
            group.barrier.abort()  # the others stop waiting; the missing result fails the test
            raise

    threads = [threading.Thread(target=member, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0, 1, 2]
    assert all(r.complete for r in results[0])
    s0 = _computed_by(out / "s0")
    assert s0[1] == half and sum(s0.values()) == _outputs(out / "s0")["tiles"]["tissue"]  # resumed
    assert results[0][1].tiles_computed == 0 and results[0][1].merged is False  # s1 was done: left as it was
    assert json.loads((out / "s1" / "summary.json").read_text()) == finished.summary
