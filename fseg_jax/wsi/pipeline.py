"""Whole-slide F-Seg: tissue detection, tiled sharded compute, resumable, QuPath and OME-TIFF outputs.

For each slide, at a working resolution of `mpp` microns per pixel:

1. a thumbnail is read and its tissue found (Otsu on saturation); the tissue mask is resampled to the
   slide's token grid (one token per patch);
2. the tiles whose core holds tissue are read in a background thread pool, a few batches ahead, and run
   through one compiled step (the model, the concept weights per token, then F-Seg's rule: the weights
   upsampled bilinearly by the patch size and argmaxed per pixel, with one context token beyond each core
   so that the interpolation runs on across tile seams; or, with resolution="token", the argmax per
   token), the batch sharded over every local device; each finished batch is painted, one tile core at a
   time, into the label map on disk at the working resolution (label 0 = background, i.e. pixels of tokens
   without tissue; label i+1 = concept i) and the token weights, then marked done in the work folder (a
   process computing a share of a split slide saves the batch's labels there instead, for the merge to
   paint);
3. once every batch is there, the outputs are written from the label map: labels.ome.tif (its
   full-resolution level is that map, written band by band), labels.geojson (traced from it, see
   `merge_slide`), overlay.png, summary.json and, on request, weights.safetensors; then the work folder is
   removed. When the bank names the concepts of its k, the outputs show classes instead: label j+1 = class
   j (the concepts that share a name, see `ConceptBank.classes`).

A killed run picks up from its finished batches. A run holds the slide's output folder while it works there
(`fseg_jax.wsi.lock`): a second run on the same folder is refused, or waits. Several processes (one per host,
`segment_slides(..., processes=)`) share a folder of slides as `fseg_jax.wsi.cohort` describes: each slide is
computed and written by one process, and only a slide too large for that is split by batches
(`part=(index, count)`: every `count`-th batch) and written by one of them.

This module is the front end (`SlideSegmenter`, `segment_slide`, `segment_slides`); the other steps live in
`plan` (settings, fingerprint, resume), `merge` (label map, areas, summary.json), `overlay`, `discovery`
(which slides a folder holds), `compute` (the tile step), `lock` and `cohort` (several processes). Their public names used by callers are
importable from here as well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fseg_jax.concepts.names import ConceptClasses, check_classes
from fseg_jax.options import (
    DEFAULT_TILE,
    RESOLUTIONS,
    RUN_DEFAULTS,
    SLIDE_DEFAULTS,
    check_choice,
    check_devices,
    check_int,
    check_optional_int,
    check_positive,
)
from fseg_jax.wsi.compute import DeviceMemoryError, TileStep, TokenFn, explain_out_of_memory, prefetch_batches
from fseg_jax.wsi.discovery import find_slides, slide_folder_name, slide_out_dirs
from fseg_jax.wsi.lock import FolderBusy, hold_folder, process_role
from fseg_jax.wsi.merge import OUTPUT_FILES, WEIGHTS_FILE, SlideCanvas, merge_slide, remerge_slide, slide_classes
from fseg_jax.wsi.outputs import label_dtype
from fseg_jax.wsi.plan import (
    SlideRunMismatch,
    batches_to_do,
    check_unchanged,
    finished_summary,
    model_digest,
    plan_grid,
    plan_slide,
    start_or_resume,
    tree_digest,
)
from fseg_jax.wsi.reader import Slide, SlideError, open_slide
from fseg_jax.wsi.store import WorkDir, work_fingerprint
from fseg_jax.wsi.tiling import TileGrid

if TYPE_CHECKING:
    from fseg_jax.wsi.cohort import Processes

__all__ = [
    "OUTPUT_FILES",
    "WEIGHTS_FILE",
    "DeviceMemoryError",
    "FolderBusy",
    "SlideFailure",
    "SlideResult",
    "SlideRunMismatch",
    "SlideSegmenter",
    "find_slides",
    "merge_slide",
    "segment_slide",
    "segment_slides",
    "slide_folder_name",
    "slide_out_dirs",
]


@dataclass(frozen=True)
class SlideResult:
    """One slide's run.

    complete: the outputs exist (False only for a process that wrote its share of a multi-process run);
    tiles: tiles with tissue; tiles_computed: how many of them this call computed (fewer after a resume,
    0 when the outputs were already there or were written anew from earlier work); summary: the contents
    of summary.json once complete (None for a slide another process of a multi-process run wrote); merged:
    this call wrote the outputs (False when they were already there, and for a share of a multi-process
    run); replaced: what this run discarded of another run's (unfinished work or finished outputs with other
    settings), in one sentence, or None; process: the index of the process that ran it (0 in a one-process
    run).
    """

    slide: Path
    out_dir: Path
    complete: bool
    tiles: int
    tiles_computed: int
    seconds: float
    summary: dict | None = None
    merged: bool = False
    replaced: str | None = None
    process: int = 0


@dataclass(frozen=True)
class SlideFailure:
    """A slide of a batch that could not be segmented, and why (process: the process that reports it)."""

    slide: Path
    error: str
    process: int = 0


@dataclass(frozen=True)
class SlideSurvey:
    """What a slide run has left to do: done (its outputs are there), tiles with tissue, remaining: {batch
    index: tiles} of the batches not computed yet, discarded: what the survey discarded of another run's
    unfinished work (as SlideResult.replaced says it), or None."""

    done: bool
    tiles: int
    remaining: dict[int, int]
    discarded: str | None = None


class SlideSegmenter:
    """A compiled tile step and the settings of a slide run; `run` it on any number of slides.

    fn, params: a token function as `fseg_jax.segmentation.make_token_fn` returns it, fn(params, (B, T, T, 3)
    uint8) -> (B, T/p, T/p, k) concept weights; `from_pipeline` builds one from a `fseg_jax.Pipeline` (the run's
    description: model, bank and options), `from_model` from `Pipeline.create`'s arguments.
    patch_size: the model's patch (token) size p in pixels. tile: tile side in working pixels (a multiple
    of p; default ``DEFAULT_TILE`` rounded down to a multiple of p: 1024 at patch 8 or 16, 1022 at 14);
    margin: context discarded on each side (a multiple of p; default tile/16 rounded down to a multiple of p:
    64 at tile 1024, 56 at 1022); batch: tiles per step (rounded up to a multiple of the device count; smaller
    batches are computed at the next power of two); mpp: working microns per pixel; resolution: "pixel"
    (labels per pixel by F-Seg's rule, the default) or "token" (one label per token, faster); save_weights:
    also keep the (h, w, k) token weights; devices: the devices to shard the batch over (default: all local);
    workers: reader threads (default: one per CPU core, at most 32); info: what to record in summary.json about the model and bank (its "bank" entry,
    the bank's path or description, does not enter the tiles' work fingerprint); params_id: what
    identifies `params` in the resume fingerprint (`from_model` gives a digest of the model's checkpoint and
    of the concepts; default: `fseg_jax.wsi.plan.tree_digest` of every parameter value); classes: the
    bank's classes for k (`ConceptBank.classes`, which `from_model` takes from a bank with names for k):
    the outputs show classes instead of concepts (see `merge_slide`). They enter the fingerprint but not
    the tiles' work: a run with other names, or with the named bank saved elsewhere, merges the batches a
    killed or multi-process run left, or the label map of a finished run without names (`remerge_slide`).
    """

    def __init__(
        self,
        fn: TokenFn,
        params,
        *,
        patch_size: int,
        k: int,
        tile: int | None = None,
        margin: int | None = None,
        batch: int = RUN_DEFAULTS["batch"],
        mpp: float = SLIDE_DEFAULTS["mpp"],
        resolution: str = SLIDE_DEFAULTS["resolution"],
        save_weights: bool = False,
        devices: Sequence | None = None,
        workers: int | None = None,
        info: dict[str, Any] | None = None,
        params_id: str | None = None,
        classes: ConceptClasses | None = None,
    ):
        patch_size = check_int("patch_size", patch_size)
        batch = check_int("batch", batch)
        mpp = check_positive("mpp", mpp)
        check_choice("resolution", resolution, RESOLUTIONS)
        devices = check_devices(devices)
        if tile is None:
            tile = DEFAULT_TILE // patch_size * patch_size
        tile = check_int("tile", tile)
        margin = check_optional_int("margin", margin, minimum=0)
        # one tile's grid: checks tile and margin against the patch size and settles the default margin
        grid = TileGrid.for_slide((tile, tile), patch=int(patch_size), tile=int(tile), margin=margin)
        self.patch_size = grid.patch
        self.k = int(k)
        self.tile = grid.tile
        self.margin = grid.margin
        self.mpp = float(mpp)
        self.resolution = resolution
        self.save_weights = bool(save_weights)
        self.workers = int(workers or min(32, os.cpu_count() or 4))
        self.info = dict(info or {})
        self.step = TileStep(
            fn, params, batch=batch, patch=grid.patch, margin_tokens=grid.margin_tokens,
            core_tokens=grid.core_tokens, label_dtype=label_dtype(self.k + 1), resolution=resolution,
            with_weights=save_weights, devices=devices,
        )
        self.params_id = params_id or tree_digest(params)
        check_classes(classes, self.k)
        self.classes = classes

    @classmethod
    def from_pipeline(
        cls,
        pipeline,
        *,
        tile: int | None = SLIDE_DEFAULTS["tile"],
        margin: int | None = SLIDE_DEFAULTS["margin"],
        mpp: float = SLIDE_DEFAULTS["mpp"],
        resolution: str = SLIDE_DEFAULTS["resolution"],
        save_weights: bool = False,
        devices: Sequence | None = None,
        workers: int | None = None,
    ) -> SlideSegmenter:
        """The slide run of a `fseg_jax.Pipeline`: its model, concepts, options and `batch` (tiles per step).

        The other arguments are the constructor's. An NMF method whose components a tile's tokens cannot hold
        (``fseg_jax.options.check_components``) is refused here, before any slide is read. Method "factorize"
        labels pixels as `segment` does (`Pipeline.tile_fn`): the component weights upsampled, argmaxed and
        mapped to concepts; its saved weights are each concept's largest component weight.
        """
        config = pipeline.model.config
        patch = int(config.patch_size)
        side = DEFAULT_TILE // patch * patch if tile is None else tile
        if isinstance(side, int) and side >= patch:
            pipeline.check_tokens((side // patch) ** 2, f"a tile of {side} px")
        fn, params = pipeline.tile_fn()
        params_id = f"model {model_digest(pipeline.model)}, concepts {tree_digest(params['concepts'])}"
        layers = pipeline.layers
        info = {
            "model": pipeline.model_source, "bank": pipeline.bank_source, "method": pipeline.method,
            "layer": layers[0] if len(layers) == 1 else list(layers),
            "dtype": "float32" if pipeline.dtype is None else pipeline.dtype.name,
            "n_components": pipeline.n_components, "seed": pipeline.seed, "solver": pipeline.solver,
            "tol": pipeline.tol, "max_iter": pipeline.max_iter,
        }
        return cls(
            fn, params, patch_size=patch, k=pipeline.k, tile=tile, margin=margin, batch=pipeline.batch, mpp=mpp,
            resolution=resolution, save_weights=save_weights, devices=devices, workers=workers, info=info,
            params_id=params_id, classes=pipeline.classes,
        )

    @classmethod
    def from_model(
        cls,
        model=None,
        concepts=None,
        *,
        tile: int | None = SLIDE_DEFAULTS["tile"],
        margin: int | None = SLIDE_DEFAULTS["margin"],
        mpp: float = SLIDE_DEFAULTS["mpp"],
        resolution: str = SLIDE_DEFAULTS["resolution"],
        save_weights: bool = False,
        devices: Sequence | None = None,
        workers: int | None = None,
        **options,
    ) -> SlideSegmenter:
        """From a model (object, preset name, folder, or None for the one the bank records) and concepts
        (ConceptBank, path, preset or (k, d) array): `options` (k, method, layer, batch, dtype, ...) go untouched
        to `fseg_jax.Pipeline.create`, the rest to `from_pipeline`."""
        from fseg_jax.segmentation import Pipeline

        return cls.from_pipeline(
            Pipeline.create(concepts, model=model, **options), tile=tile, margin=margin, mpp=mpp,
            resolution=resolution, save_weights=save_weights, devices=devices, workers=workers,
        )

    # -- one slide ---------------------------------------------------------------------------------
    def run(
        self,
        slide: str | Path | Slide,
        out_dir: str | Path,
        *,
        slide_mpp: float | None = None,
        force_slide_mpp: bool = False,
        part: tuple[int, int] | None = None,
        process: tuple[int, int] | None = None,
        wait: bool = False,
        progress: bool = False,
        progress_position: int = 0,
    ) -> SlideResult:
        """Segment one slide into `out_dir` (the slide's own folder), resuming whatever is already there.

        The run holds the folder (`fseg_jax.wsi.lock.hold_folder`): another run there raises FolderBusy,
        naming it, or with `wait` is waited for. Work that another run left there with other settings is
        replaced, and the result's `replaced` says so.
        part: (index, count) of a slide split over several processes: this process computes batches index,
        index+count, ... and, when count > 1, saves each batch's labels in the work folder and leaves the
        outputs to `merge_slide`; the caller then holds the folder for all of them (see `fseg_jax.wsi.cohort`).
        Default (0, 1): every batch, each painted into the work folder's label map as it finishes, then the
        outputs. A work folder holding a run with other settings is then an error (`SlideRunMismatch`), not
        replaced: the processes must agree, and a batch computed under other settings never counts as done.
        process: (index, count) of this process in its run, recorded with each batch it computes
        (summary.json's computed_by); default `part`. A device without the memory for a batch raises
        `DeviceMemoryError`, which says which smaller batch or tile to try.
        A finished run without classes whose tiles these settings compute alike (the same concepts, now
        named or saved elsewhere) is merged anew (`remerge_slide`): its concept map is written out with
        these settings' classes and no tile is computed; when its labels.ome.tif is missing or not its
        concept map, the tiles are. slide_mpp, force_slide_mpp: as for `fseg_jax.wsi.open_slide`.
        """
        index, count = part if part is not None else (0, 1)
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count} does not exist")
        process = process or (index, count)
        if count > 1:
            return self._run(slide, Path(out_dir), slide_mpp, force_slide_mpp, (index, count), process, progress,
                             progress_position)
        with hold_folder(out_dir, wait=wait, role=process_role(process)):
            return self._run(slide, Path(out_dir), slide_mpp, force_slide_mpp, (index, count), process, progress,
                             progress_position)

    def survey(
        self,
        slide: str | Path,
        out_dir: str | Path,
        *,
        slide_mpp: float | None = None,
        force_slide_mpp: bool = False,
        process: tuple[int, int] = (0, 1),
        wait: bool = False,
    ) -> SlideSurvey:
        """Find the tissue of a slide and start (or resume) its run in `out_dir` without computing a tile; say
        what is left. The folder is held meanwhile, as by `run`."""
        with (
            hold_folder(out_dir, wait=wait, role=process_role(process)),
            open_slide(slide, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp) as reader,
        ):
            out_dir = Path(out_dir)
            plan = plan_slide(reader, self.mpp, self.settings())
            done = finished_summary(out_dir, plan["fingerprint"])
            if done is not None:
                return SlideSurvey(True, done["tiles"]["tissue"], {})
            plan, discarded = start_or_resume(WorkDir(out_dir), reader, plan, batch=self.step.batch, shared=False)
            finished = WorkDir(out_dir).done(work_fingerprint(plan))
            remaining = {b: len(tiles) for b, tiles in enumerate(plan["batches"]) if b not in finished}
            return SlideSurvey(False, sum(len(b) for b in plan["batches"]), remaining, discarded)

    def _run(
        self,
        slide: str | Path | Slide,
        out_dir: Path,
        slide_mpp: float | None,
        force_slide_mpp: bool,
        part: tuple[int, int],
        process: tuple[int, int],
        progress: bool,
        progress_position: int,
    ) -> SlideResult:
        t_start = time.perf_counter()
        count = part[1]
        owned = not isinstance(slide, Slide)
        reader = open_slide(slide, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp) if owned else slide
        try:
            plan = plan_slide(reader, self.mpp, self.settings())
            done = finished_summary(out_dir, plan["fingerprint"])
            if done is not None:
                WorkDir(out_dir).clear()  # left behind only by a kill between the summary and the cleanup
                return SlideResult(
                    reader.path, out_dir, True, done["tiles"]["tissue"], 0, time.perf_counter() - t_start, done,
                    process=process[0],
                )
            out_dir.mkdir(parents=True, exist_ok=True)
            work = WorkDir(out_dir)
            replaced = replaces_outputs(out_dir) if count == 1 else None
            plan, discarded = start_or_resume(work, reader, plan, batch=self.step.batch, shared=count > 1)
            # a finished run of these tiles without names: its label map is written anew, no tile computed
            summary = remerge_slide(out_dir) if count == 1 else None
            if summary is not None:
                n_tiles = summary["tiles"]["tissue"]
                return SlideResult(
                    reader.path, out_dir, True, n_tiles, 0, time.perf_counter() - t_start, summary, merged=True,
                    process=process[0],
                )
            computed = self._compute(reader, plan, work, part, process, progress, progress_position)
        finally:
            if owned:
                reader.close()
        n_tiles = sum(len(b) for b in plan["batches"])
        if count > 1:
            check_unchanged(work, plan)
            return SlideResult(
                reader.path, out_dir, False, n_tiles, computed, time.perf_counter() - t_start, process=process[0]
            )
        summary = merge_slide(out_dir)
        return SlideResult(
            reader.path, out_dir, True, n_tiles, computed, time.perf_counter() - t_start, summary, merged=True,
            replaced="; ".join(filter(None, (discarded, replaced))) or None, process=process[0],
        )

    def settings(self) -> dict[str, Any]:
        """What a run's plan and fingerprint record of this segmenter (see `fseg_jax.wsi.plan`)."""
        return {
            "patch": self.patch_size,
            "tile": self.tile,
            "margin": self.margin,
            "batch": self.step.batch,
            "k": self.k,
            "resolution": self.resolution,
            "save_weights": self.save_weights,
            "info": self.info,
            "params": self.params_id,
            **({} if self.classes is None else {"classes": slide_classes(self.classes)}),
        }

    def _compute(
        self,
        reader: Slide,
        plan: dict,
        work: WorkDir,
        part: tuple[int, int],
        process: tuple[int, int],
        progress: bool,
        position: int,
    ) -> int:
        from tqdm.auto import tqdm

        grid = plan_grid(plan)
        rp = reader.plan(self.mpp)
        batches = plan["batches"]
        # one process: each batch is painted into the maps as it finishes (its file then carries no labels);
        # the maps are opened first, as that makes any batch whose labels they lost not done
        canvas = SlideCanvas(work, plan) if part[1] == 1 else None
        mine, todo = batches_to_do(plan, work, part)
        total = sum(len(batches[b]) for b in mine)
        bar = tqdm(
            total=total, initial=total - sum(len(batches[b]) for b in todo), desc=reader.path.name,
            unit="tile", disable=not progress, position=position, leave=position == 0, dynamic_ncols=True,
        )

        def read(tile_index: int) -> np.ndarray:
            x, y, w, h = grid.read_box(tile_index)
            return reader.read(rp, x, y, w, h)

        computed = 0
        pending = None
        last = time.perf_counter()

        def finish(entry) -> None:
            # seconds: from the later of this batch's dispatch and the previous batch's results to this
            # batch's results, so the batches' seconds add up to the loop's time outside read waits
            nonlocal computed, last
            b, ids, handle, t0, waited = entry
            labels, weights = self.step.collect(handle)
            now = time.perf_counter()
            if canvas is not None:
                canvas.paint(ids, labels, weights)
                canvas.flush()  # on disk before the batch file says the batch is done
                labels = weights = None
            work.put(
                b, work_fingerprint(plan), ids, labels, weights, seconds=now - max(t0, last), read_wait=waited,
                process=process,
            )
            last = time.perf_counter()
            computed += len(ids)
            bar.update(len(ids))

        try:
            with explain_out_of_memory(self.step.batch, self.tile, len(self.step.devices)):
                stream = prefetch_batches((batches[b] for b in todo), read, workers=self.workers)
                for b, (ids, images, waited) in zip(todo, stream):
                    t0 = time.perf_counter()
                    entry = (b, ids, self.step.dispatch(images), t0, waited)
                    if pending is not None:
                        finish(pending)
                    pending = entry
                if pending is not None:
                    finish(pending)
        finally:
            bar.close()
        return computed


def replaces_outputs(out_dir: Path) -> str | None:
    """The sentence a run says when it will write over finished outputs (of other settings: the caller found
    none of its own), None when there are none."""
    if (out_dir / "summary.json").is_file():
        return "replaces the finished outputs of a run with other settings"
    return None


def segment_slides(
    slides: str | Path | Iterable[str | Path],
    out_root: str | Path,
    segmenter: SlideSegmenter,
    *,
    slide_mpp: float | None = None,
    force_slide_mpp: bool = False,
    processes: Processes | None = None,
    wait: bool = False,
    progress: bool = False,
    on_result: Callable[[SlideResult | SlideFailure], None] | None = None,
) -> list[SlideResult | SlideFailure]:
    """Segment a slide, a folder of slides or a list of them into `out_root/<slide name>/` each.

    A folder without slides, or two slides that would write one folder (see `slide_out_dirs`), is a
    ValueError before any work. A slide that fails (unreadable, no mpp, its folder in use by another run,
    ...) becomes a SlideFailure in the returned list and the batch goes on; `on_result` is called after
    each slide. A `DeviceMemoryError` ends the batch: every slide would meet it. slide_mpp, force_slide_mpp:
    for every slide, as for `SlideSegmenter.run`. wait: wait for a slide folder that another run holds
    instead of failing that slide.
    processes: the processes of a multi-process run (`fseg_jax.wsi.cohort.JaxProcesses`), every one of them
    calling this with the same slides and settings: the slides are spread over them, each computed and
    written by one (see `fseg_jax.wsi.cohort`); `on_result` is called for the slides this process ran, and
    every process returns the result of every slide, as the process that ran it reported it.
    """
    from tqdm.auto import tqdm

    paths = find_slides(slides)
    out_dirs = slide_out_dirs(paths, out_root)
    if processes is not None and processes.count > 1:
        from fseg_jax.wsi.cohort import run_cohort

        return run_cohort(
            paths, out_dirs, segmenter, processes, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp, wait=wait,
            progress=progress,
            on_result=on_result,
        )
    results: list[SlideResult | SlideFailure] = []
    for path, out_dir in zip(
        tqdm(paths, desc="slides", unit="slide", disable=not progress or len(paths) < 2, position=0), out_dirs
    ):
        try:
            result = segmenter.run(
                path, out_dir, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp, wait=wait, progress=progress,
                progress_position=1 if len(paths) > 1 else 0,
            )
        except DeviceMemoryError:  # every slide would fail alike: the settings must change
            raise
        except Exception as err:  # noqa: BLE001 - one bad slide must not end the batch; reported to the caller
            result = SlideFailure(path, describe_failure(err))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def describe_failure(err: Exception) -> str:
    """The one line a slide's failure is reported with."""
    return str(err) if isinstance(err, (SlideError, FolderBusy)) else f"{type(err).__name__}: {err}"


def segment_slide(
    slide: str | Path,
    out_dir: str | Path,
    concepts=None,
    *,
    pipeline=None,
    mpp: float = SLIDE_DEFAULTS["mpp"],
    slide_mpp: float | None = SLIDE_DEFAULTS["slide_mpp"],
    force_slide_mpp: bool = False,
    tile: int | None = SLIDE_DEFAULTS["tile"],
    margin: int | None = SLIDE_DEFAULTS["margin"],
    resolution: str = SLIDE_DEFAULTS["resolution"],
    save_weights: bool = False,
    devices: Sequence | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = False,
    **options,
) -> SlideResult:
    """Segment one whole slide (or plain image) with F-Seg and write its outputs into `out_dir`.

    concepts: a ConceptBank, a bank path or preset name (then `k` picks the matrix; it may be left out when
    the bank holds one), or a (k, d) array. options: the run's options (model, k, method, layer, batch, dtype,
    n_components, seed, solver, tol, max_iter, random_init, depth), passed untouched to
    `fseg_jax.Pipeline.create` as `fseg_jax.segment` passes them: `model` defaults to the model the bank records;
    `batch` is the tiles per compiled step, sharded over `devices` (default: all local devices). Or
    `pipeline`: a `fseg_jax.Pipeline` made before (then neither concepts nor options).
    mpp: working resolution in microns per pixel (0.5 ~ 20x; a pyramid level within 2 % of it is used
    as it is, at its own resolution, which summary.json records); slide_mpp: the slide's own level-0
    resolution when its file does not record it (or records it wrongly: one that contradicts the file's by
    more than 2x needs `force_slide_mpp=True`). tile: tile side in working pixels, a multiple of the patch size
    (default: 1024 rounded down to one, 1022 at patch 14); margin: context computed then discarded on each side
    (default: tile/16 rounded down to a multiple of the patch size, 64 at tile 1024, 56 at 1022).
    resolution: "pixel" (F-Seg's per-pixel argmax of the bilinearly upsampled weights, continuous across tiles)
    or "token" (one label per token, faster). save_weights: also write the (h, w, k) token weights. part:
    (index, count) of a multi-process run (see `SlideSegmenter.run`).

    Outputs in `out_dir`: labels.ome.tif (label 0 = background, i+1 = concept i, pyramidal, physical pixel
    size and label names set), labels.geojson (QuPath annotations in level-0 pixels), overlay.png,
    summary.json (and weights.safetensors). A bank that names the concepts of k (`ConceptBank.with_names`)
    makes them classes: i+1 = class i, with the class's name and colour, and summary.json adds each
    class's area. Re-running resumes a killed run; finished outputs are not recomputed.
    """
    if pipeline is None:
        from fseg_jax.segmentation import Pipeline

        pipeline = Pipeline.create(concepts, **options)
    elif concepts is not None or options:
        raise ValueError("pass either pipeline= or the concepts and options to make one, not both")
    segmenter = SlideSegmenter.from_pipeline(
        pipeline, tile=tile, margin=margin, mpp=mpp, resolution=resolution, save_weights=save_weights,
        devices=devices,
    )
    return segmenter.run(slide, out_dir, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp, part=part,
                         progress=progress)
