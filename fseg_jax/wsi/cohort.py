"""A folder of slides over several processes (one per host): each slide computed and written by one of them.

Every process runs `segment_slides(..., processes=)` on the same slides with the same settings:

1. **survey**: slide s is surveyed by process s mod N (its tissue found, its run started or resumed in its
   folder, no tile computed); the processes publish what each slide has left (the tiles of each batch not
   computed yet, or that it is done or failed) in the coordinator's key-value store, and wait for each other;
2. **assignment** (`assign_slides`): from that shared view, every process computes the same assignment,
   balanced by work (the tiles left) and longest first: a slide whose work exceeds a process's fair share
   (total / N) would keep the others idle, so only such a slide is split into parts (every P-th batch, see
   `SlideSegmenter.run`'s `part`), and its outputs are written by one of the processes computing its parts
   (its *merger*, which holds the slide's folder meanwhile); every other slide is one unit;
3. **compute**: each process computes its parts (longest first) and publishes each; then, as a merger, waits
   for its split slides' other parts and writes their outputs; then computes its whole slides (longest
   first), writing each one's outputs at once. Each slide is reported (`on_result`) by the process that
   wrote it, or that found it failed;
4. **end**: the processes wait for each other and read every slide's outcome from the store, so that each
   ends with the same view of what is done.

The assignment is a function of what is left, not of N alone: a re-run after a kill (of any process, or with
another N) assigns the slides still to do, each resuming the batches its folder holds. A slide that fails is
reported by the process that ran it (by its merger for a split slide) and the others go on. `JaxProcesses`
is the store and barriers of `jax.distributed` (initialised by the caller: cluster auto-detection or an
explicit coordinator).
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fseg_jax.wsi.lock import hold_folder, process_role
from fseg_jax.wsi.merge import merge_slide
from fseg_jax.wsi.pipeline import (
    DeviceMemoryError,
    SlideFailure,
    SlideResult,
    SlideSegmenter,
    describe_failure,
    replaces_outputs,
)
from fseg_jax.wsi.plan import SlideRunMismatch

WAIT_MS = 7 * 24 * 3600 * 1000
"""How long a process waits for the others at a barrier or for a part (a week: a slow process is not an
error; a dead one ends the run through jax.distributed's heartbeats)."""


class Processes(abc.ABC):
    """The processes of a multi-process run as a cohort needs them: this one's `index` of `count`, barriers
    and a key-value store of strings shared by all. `scope` gives each cohort run of a session its own keys
    (every process calls the same runs in the same order)."""

    def __init__(self, index: int, count: int):
        self.index = int(index)
        self.count = int(count)
        self._runs = 0

    def scope(self) -> str:
        self._runs += 1
        return f"fseg_jax/cohort/{self._runs}/"

    @abc.abstractmethod
    def barrier(self, name: str) -> None:
        """Wait until every process has reached the barrier `name`."""

    @abc.abstractmethod
    def publish(self, key: str, value: str) -> None:
        """Set `key` to `value` for every process to read."""

    @abc.abstractmethod
    def read(self, key: str) -> str:
        """The value at `key`, waiting until some process publishes it."""

    @abc.abstractmethod
    def read_all(self, prefix: str) -> dict[str, str]:
        """Every key under `prefix` published so far, with its value."""


class JaxProcesses(Processes):
    """`Processes` through the client of `jax.distributed` (call `jax.distributed.initialize` first)."""

    def __init__(self):
        import jax
        from jax._src.distributed import global_state

        if global_state.client is None:
            raise RuntimeError("jax.distributed is not initialised: call jax.distributed.initialize() first")
        super().__init__(jax.process_index(), jax.process_count())
        self._client = global_state.client

    def barrier(self, name: str) -> None:
        self._client.wait_at_barrier(name, WAIT_MS)

    def publish(self, key: str, value: str) -> None:
        self._client.key_value_set(key, value)

    def read(self, key: str) -> str:
        return self._client.blocking_key_value_get(key, WAIT_MS)

    def read_all(self, prefix: str) -> dict[str, str]:
        return dict(self._client.key_value_dir_get(prefix))


@dataclass(frozen=True)
class Unit:
    """A slide (`slide`: its index in the input) or part `part` of its `parts` (1 = the whole slide, computed
    and written by one process); work: its tiles."""

    slide: int
    part: int
    parts: int
    work: int


@dataclass(frozen=True)
class Assignment:
    """units[i]: what process i runs, in order; mergers: {split slide: the process that writes its outputs}."""

    units: tuple[tuple[Unit, ...], ...]
    mergers: Mapping[int, int]

    def loads(self) -> list[int]:
        """Tiles per process."""
        return [sum(u.work for u in units) for units in self.units]


MERGE_WEIGHT = 0.2
"""What writing a slide's outputs weighs against computing its tiles, as the assignment estimates it (a whole
slide's outputs are written by the process that computes it, so only a split slide's merge needs it)."""


def assign_slides(remaining: Sequence[Mapping[int, int]], count: int, *, merge_weight: float = MERGE_WEIGHT) -> Assignment:
    """Spread slides over `count` processes, balanced by work: remaining[s] = {batch index: tiles} of the
    batches slide s has left (a slide with none left but its outputs to write weighs 1).

    ideal = total / count. A slide heavier than ideal would keep the others idle: it is split into P =
    min(count, its batches, ceil(2 w / ideal)) parts (part p: its batches b with b mod P == p), each about
    half the ideal or less. The parts are dealt first, longest first (ties: lower slide, lower part), each to
    the process with the least work so far (ties: lower index); each split slide's merge goes to the least
    loaded of the processes holding its parts, weighing `merge_weight` times its tiles; then the whole slides
    are dealt the same way. A process runs its parts, then its merges, then its whole slides, so no process
    waits for a part before it has computed its own. Deterministic: the same input gives the same assignment
    on every process.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    weights = [max(1, sum(r.values())) for r in remaining]
    ideal = sum(weights) / count
    parts: list[Unit] = []
    wholes: list[Unit] = []
    for s, (batches, w) in enumerate(zip(remaining, weights)):
        n_parts = min(count, len(batches), math.ceil(2 * w / ideal)) if w > ideal else 1
        if n_parts <= 1:
            wholes.append(Unit(s, 0, 1, w))
        for p in range(n_parts if n_parts > 1 else 0):
            parts.append(Unit(s, p, n_parts, sum(t for b, t in batches.items() if b % n_parts == p)))
    per_process: list[list[Unit]] = [[] for _ in range(count)]
    loads = [0.0] * count

    def deal(units: list[Unit]) -> None:
        heap = [(load, i) for i, load in enumerate(loads)]
        heapq.heapify(heap)
        for unit in sorted(units, key=lambda u: (-u.work, u.slide, u.part)):
            load, i = heapq.heappop(heap)
            per_process[i].append(unit)
            loads[i] = load + unit.work
            heapq.heappush(heap, (loads[i], i))

    deal(parts)
    holders: dict[int, list[int]] = {}
    for i, units in enumerate(per_process):
        for u in units:
            holders.setdefault(u.slide, []).append(i)
    mergers = {}
    for s in sorted(holders, key=lambda s: (-weights[s], s)):
        mergers[s] = min(holders[s], key=lambda i: (loads[i], i))
        loads[mergers[s]] += merge_weight * weights[s]
    deal(wholes)
    return Assignment(tuple(tuple(units) for units in per_process), dict(sorted(mergers.items())))


def run_cohort(
    paths: Sequence[Path],
    out_dirs: Sequence[Path],
    segmenter: SlideSegmenter,
    processes: Processes,
    *,
    slide_mpp: float | None = None,
    force_slide_mpp: bool = False,
    wait: bool = False,
    progress: bool = False,
    on_result: Callable[[SlideResult | SlideFailure], None] | None = None,
) -> list[SlideResult | SlideFailure]:
    """Run `segmenter` on the slides with the other processes (see the module docstring); every process
    returns every slide's result, as the process that ran it reported it (`segment_slides` is the front end).
    Raises SlideRunMismatch on every process, before any tile is computed, when the processes' settings differ.
    """
    me, n = processes.index, processes.count
    scope = processes.scope()
    reading = {"slide_mpp": slide_mpp, "force_slide_mpp": force_slide_mpp}  # how every process opens the slides
    process = (me, n)
    mine: dict[int, SlideResult | SlideFailure] = {}

    def report(s: int, result: SlideResult | SlideFailure) -> None:
        mine[s] = result
        processes.publish(f"{scope}outcome/{s}", json.dumps(_outcome(result)))
        if on_result is not None:
            on_result(result)

    processes.publish(f"{scope}settings/{me}", json.dumps(_run_settings(segmenter, reading), sort_keys=True))
    processes.barrier(f"{scope}started")
    _check_settings(processes.read_all(f"{scope}settings/"))
    for s in range(me, len(paths), n):
        try:
            survey = segmenter.survey(paths[s], out_dirs[s], **reading, process=process, wait=wait)
        except Exception as err:  # noqa: BLE001 - one bad slide must not end the run; reported by its surveyor
            processes.publish(f"{scope}survey/{s}", json.dumps({"failed": True}))
            report(s, SlideFailure(paths[s], describe_failure(err), me))
            continue
        record = {"remaining": _runs(survey.remaining), "discarded": survey.discarded}
        processes.publish(f"{scope}survey/{s}", json.dumps(record if not survey.done else {"done": True}))
        if survey.done:
            report(s, SlideResult(paths[s], out_dirs[s], True, survey.tiles, 0, 0.0, process=me))
    processes.barrier(f"{scope}surveyed")
    surveys = {int(key.rpartition("/")[2]): json.loads(v) for key, v in processes.read_all(f"{scope}survey/").items()}
    todo = [s for s in range(len(paths)) if "remaining" in surveys[s]]
    assignment = assign_slides([_from_runs(surveys[s]["remaining"]) for s in todo], n)

    with contextlib.ExitStack() as stack:
        # a merger holds each of its split slides' folders from now until that slide's outputs are written
        busy: dict[int, str] = {}
        held: dict[int, contextlib.ExitStack] = {}
        for s in (todo[i] for i, merger in assignment.mergers.items() if merger == me):
            held[s] = stack.enter_context(contextlib.ExitStack())
            try:
                held[s].enter_context(hold_folder(out_dirs[s], wait=wait, role=process_role(process)))
            except Exception as err:  # noqa: BLE001 - reported by the merger, the parts skipped
                busy[s] = describe_failure(err)
            processes.publish(f"{scope}held/{s}", busy.get(s, ""))
        units = assignment.units[me]
        for unit in (u for u in units if u.parts > 1):
            s = todo[unit.slide]
            if processes.read(f"{scope}held/{s}"):
                processes.publish(f"{scope}part/{s}/{unit.part}", json.dumps({"error": "its folder is in use"}))
                continue
            try:
                part = segmenter.run(
                    paths[s], out_dirs[s], **reading, part=(unit.part, unit.parts), process=process,
                    progress=progress,
                )
                record = {"computed": part.tiles_computed, "seconds": part.seconds}
                if on_result is not None:
                    on_result(part)
            except DeviceMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - reported by the slide's merger
                record = {"error": describe_failure(err), "process": me}
            processes.publish(f"{scope}part/{s}/{unit.part}", json.dumps(record))
        for i, merger in assignment.mergers.items():
            if merger == me:
                s = todo[i]
                parts = next(u.parts for units in assignment.units for u in units if u.slide == i)
                if s in busy:
                    report(s, SlideFailure(paths[s], busy[s], me))
                    continue
                report(s, _merge_parts(processes, f"{scope}part/{s}/", parts, paths[s], out_dirs[s], me, surveys[s]))
                held[s].close()
        for unit in (u for u in units if u.parts == 1):
            s = todo[unit.slide]
            try:
                result = segmenter.run(
                    paths[s], out_dirs[s], **reading, process=process, wait=wait, progress=progress
                )
            except DeviceMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - one bad slide must not end the run
                result = SlideFailure(paths[s], describe_failure(err), me)
            discarded = surveys[s]["discarded"]  # by the survey, so the run itself found nothing to discard
            if isinstance(result, SlideResult) and discarded:
                result = replace(result, replaced="; ".join(filter(None, (discarded, result.replaced))))
            report(s, result)
    processes.barrier(f"{scope}finished")
    outcomes = {int(key.rpartition("/")[2]): json.loads(v) for key, v in processes.read_all(f"{scope}outcome/").items()}
    return [mine.get(s) or _from_outcome(paths[s], out_dirs[s], outcomes[s]) for s in range(len(paths))]


def _runs(remaining: Mapping[int, int]) -> list[list[int]]:
    """{batch index: tiles} as [[first, stop, tiles], ...], runs of consecutive batches of as many tiles: a
    slide's record in the store stays a few numbers (its batches are full but the last)."""
    runs: list[list[int]] = []
    for b, tiles in sorted(remaining.items()):
        if runs and runs[-1][1] == b and runs[-1][2] == tiles:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1, tiles])
    return runs


def _from_runs(runs: list[list[int]]) -> dict[int, int]:
    return {b: tiles for first, stop, tiles in runs for b in range(first, stop)}


def _merge_parts(
    processes: Processes, prefix: str, parts: int, path: Path, out_dir: Path, me: int, survey: dict
) -> SlideResult | SlideFailure:
    """Wait for the `parts` records of a split slide (under `prefix`), then write its outputs (its merger,
    this process, holds the folder)."""
    records = [json.loads(processes.read(f"{prefix}{p}")) for p in range(parts)]
    failed = [(p, r) for p, r in enumerate(records) if "error" in r]
    if failed:
        p, r = failed[0]
        where = f" on process {r['process']}" if "process" in r else ""
        return SlideFailure(path, f"part {p + 1} of {parts} failed{where}: {r['error']}", me)
    replaced = "; ".join(filter(None, (survey["discarded"], replaces_outputs(out_dir)))) or None
    try:
        summary = merge_slide(out_dir)
    except Exception as err:  # noqa: BLE001 - reported for this slide; the run goes on
        return SlideFailure(path, describe_failure(err), me)
    return SlideResult(
        path, out_dir, True, summary["tiles"]["tissue"], sum(r["computed"] for r in records),
        sum(r["seconds"] for r in records), summary, merged=True, replaced=replaced, process=me,
    )


def _run_settings(segmenter: SlideSegmenter, reading: dict) -> dict:
    return {**segmenter.settings(), "mpp": segmenter.mpp, **reading}


def _check_settings(published: dict[str, str]) -> None:
    """SlideRunMismatch naming the settings in which the processes differ."""
    settings = {int(key.rpartition("/")[2]): json.loads(v) for key, v in published.items()}
    first = settings[min(settings)]
    for index, other in sorted(settings.items()):
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if keys:
            differ = "; ".join(f"{k}: {first.get(k)!r} on process {min(settings)}, {other.get(k)!r} on process {index}" for k in keys)
            raise SlideRunMismatch(
                f"the processes of this run use different settings ({differ}): start every process with the same options"
            )


def _outcome(result: SlideResult | SlideFailure) -> dict:
    if isinstance(result, SlideFailure):
        return {"error": result.error, "process": result.process}
    return {
        "complete": result.complete, "tiles": result.tiles, "tiles_computed": result.tiles_computed,
        "seconds": result.seconds, "merged": result.merged, "replaced": result.replaced, "process": result.process,
    }


def _from_outcome(path: Path, out_dir: Path, outcome: dict) -> SlideResult | SlideFailure:
    if "error" in outcome:
        return SlideFailure(path, outcome["error"], outcome["process"])
    return SlideResult(
        path, out_dir, outcome["complete"], outcome["tiles"], outcome["tiles_computed"], outcome["seconds"],
        merged=outcome["merged"], replaced=outcome["replaced"], process=outcome["process"],
    )
