"""Whole-slide F-Seg: tissue detection, tiled sharded compute, resumable, QuPath and OME-TIFF outputs.

For each slide, at a working resolution of `mpp` microns per pixel:

1. a thumbnail is read and its tissue found (Otsu on saturation); the tissue mask is resampled to the
   slide's token grid (one token per patch);
2. the tiles whose core holds tissue are read in a background thread pool, a few batches ahead, and run
   through one compiled step (the model, the concept weights per token, then F-Seg's rule: the weights
   upsampled bilinearly by the patch size and argmaxed per pixel, with one context token beyond each core
   so that the interpolation runs on across tile seams; or, with resolution="token", the argmax per
   token), the batch sharded over every local device; each finished batch is saved in the work folder;
3. once every batch is there, the label map (label 0 = background, i.e. pixels of tokens without tissue;
   label i+1 = concept i) is assembled on disk at the working resolution, one tile core at a time, and
   written: labels.ome.tif (its full-resolution level is that map, written band by band), labels.geojson
   (traced from it, see `merge_slide`), overlay.png, summary.json and, on request, weights.safetensors;
   then the work folder is removed.

A killed run picks up from its finished batches. With several processes (one per host), each takes every
`count`-th batch of `part=(index, count)` and writes it to the shared output folder; `merge_slide` then
writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fseg_jax.wsi.compute import TileStep, TokenFn, prefetch_batches
from fseg_jax.wsi.outputs import (
    array_sampler,
    atomic_path,
    label_dtype,
    remove_stale_temporaries,
    write_geojson,
    write_json,
    write_label_tiff,
    write_weights,
)
from fseg_jax.wsi.reader import SLIDE_SUFFIXES, Slide, SlideError, open_slide
from fseg_jax.wsi.store import WorkDir
from fseg_jax.wsi.tiling import TileGrid
from fseg_jax.wsi.tissue import detect_tissue

OUTPUT_FILES = ("labels.ome.tif", "labels.geojson", "overlay.png", "summary.json")
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class SlideResult:
    """One slide's run.

    complete: the outputs exist (False only for a process that wrote its share of a multi-process run);
    tiles: tiles with tissue; tiles_computed: how many of them this call computed (fewer after a resume,
    0 when the outputs were already there); summary: the contents of summary.json once complete.
    """

    slide: Path
    out_dir: Path
    complete: bool
    tiles: int
    tiles_computed: int
    seconds: float
    summary: dict | None = None


@dataclass(frozen=True)
class SlideFailure:
    """A slide of a batch that could not be segmented, and why."""

    slide: Path
    error: str


def _params_digest(params) -> str:
    """A cheap fingerprint of a parameter tree: every leaf's shape, dtype and a strided sample of its values."""
    import jax

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.asarray(leaf)
        h.update(f"{a.shape}{a.dtype}".encode())
        flat = a.reshape(-1)
        h.update(np.ascontiguousarray(flat[:: max(1, flat.size // 4096)]).tobytes())
    return h.hexdigest()


def _concept_names(k: int) -> list[str]:
    return ["background"] + [f"concept {i}" for i in range(k)]


def _palette(n: int) -> np.ndarray:
    from fseg_jax.visualize import palette

    return np.asarray(palette(n), np.uint8)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("fseg_jax", "jax", "jaxlib", "flax", "numpy", "tifffile", "tiffslide", "openslide-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        import openslide

        out["openslide"] = openslide.__library_version__
    except ImportError:  # pragma: no cover
        pass
    return out


class SlideSegmenter:
    """A compiled tile step and the settings of a slide run; `run` it on any number of slides.

    fn, params: a token function as `fseg_jax.segmentation.make_token_fn` returns it, fn(params, (B, T, T, 3)
    uint8) -> (B, T/p, T/p, k) concept weights; `from_model` builds one from a model and a concept bank.
    patch_size: the model's patch (token) size p in pixels. tile: tile side in working pixels (a multiple
    of p); margin: context discarded on each side (a multiple of p; default tile/16); batch: tiles per step
    (rounded up to a multiple of the device count; smaller batches are computed at the next power of two);
    mpp: working microns per pixel; resolution: "pixel" (labels per pixel by F-Seg's rule, the default) or
    "token" (one label per token, faster); save_weights: also keep the (h, w, k) token weights; devices:
    the devices to shard the batch over (default: all local); workers: reader threads (default: one per
    CPU core, at most 32); info: what to record in summary.json about the model and bank.
    """

    def __init__(
        self,
        fn: TokenFn,
        params,
        *,
        patch_size: int,
        k: int,
        tile: int = 1024,
        margin: int | None = None,
        batch: int = 16,
        mpp: float = 0.5,
        resolution: str = "pixel",
        save_weights: bool = False,
        devices: Sequence | None = None,
        workers: int | None = None,
        info: dict[str, Any] | None = None,
    ):
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
        self._digest = _params_digest(params)

    @classmethod
    def from_model(
        cls,
        model,
        concepts,
        *,
        k: int | None = None,
        method: str = "project",
        layer: int | Sequence[int] = -1,
        dtype=None,
        n_components: int = 20,
        seed: int = 0,
        solver: str | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        **kwargs,
    ) -> SlideSegmenter:
        """From a model (object, preset name or folder) and concepts (ConceptBank, path, preset or (k, d) array).

        k, method, layer, dtype, n_components, seed, solver, tol, max_iter: as for `fseg_jax.segment` (k may
        be left out when the bank holds one k), all passed to `make_token_fn`. dtype: compute dtype of the
        forward pass, e.g. "bfloat16" (default: the model's own, float32). Other keyword arguments as for
        the constructor. For method "factorize" the tile step upsamples each concept's largest component
        weight (`make_token_fn`'s scores), where `segment` upsamples the component weights and maps the
        argmax, so labels between token centres may differ from `segment`'s.
        """
        import jax.numpy as jnp

        from fseg_jax.segmentation import make_token_fn

        dtype = None if dtype is None else jnp.dtype(dtype)
        model_desc = None
        if isinstance(model, (str, Path)):
            from fseg_jax.hub import resolve_model

            model_desc = str(model)
            model = resolve_model(model)
        config = model.config
        model_desc = model_desc or getattr(config, "name", type(model).__name__)
        # make_token_fn resolves and checks the bank (path, preset, ConceptBank or array) against the model
        options = dict(
            k=k, method=method, layer=layer, dtype=dtype, n_components=n_components, seed=seed, solver=solver,
            tol=tol, max_iter=max_iter,
        )
        fn, params = make_token_fn(model, concepts, **options)
        k = int(params["concepts"].shape[0])
        info = {
            "model": model_desc, "bank": _describe_concepts(concepts), "method": method, "layer": layer,
            "dtype": "float32" if dtype is None else dtype.name, "n_components": n_components, "seed": seed,
            "solver": solver, "tol": tol, "max_iter": max_iter,
        }
        return cls(fn, params, patch_size=config.patch_size, k=k, info=info, **kwargs)

    # -- one slide ---------------------------------------------------------------------------------
    def run(
        self,
        slide: str | Path | Slide,
        out_dir: str | Path,
        *,
        slide_mpp: float | None = None,
        part: tuple[int, int] | None = None,
        progress: bool = False,
        progress_position: int = 0,
    ) -> SlideResult:
        """Segment one slide into `out_dir` (the slide's own folder), resuming whatever is already there.

        part: (index, count) of a multi-process run (e.g. jax.process_index(), jax.process_count()): this
        process computes batches index, index+count, ... and, when count > 1, leaves the outputs to
        `merge_slide`. Default (0, 1): every batch, then the outputs. In a multi-process run a work folder
        holding a run with other settings is an error (`SlideRunMismatch`), not replaced: the processes
        must agree, and a batch computed under other settings never counts as done.
        """
        t_start = time.perf_counter()
        index, count = part if part is not None else (0, 1)
        if not 0 <= index < count:
            raise ValueError(f"part {index} of {count} does not exist")
        out_dir = Path(out_dir)
        owned = not isinstance(slide, Slide)
        reader = open_slide(slide, slide_mpp=slide_mpp) if owned else slide
        try:
            plan = self._plan(reader)
            summary_path = out_dir / "summary.json"
            if summary_path.is_file():
                done = json.loads(summary_path.read_text())
                if done.get("fingerprint") == plan["fingerprint"]:
                    WorkDir(out_dir).clear()  # left behind only by a kill between the summary and the cleanup
                    return SlideResult(
                        reader.path, out_dir, True, done["tiles"]["tissue"], 0, time.perf_counter() - t_start, done
                    )
            out_dir.mkdir(parents=True, exist_ok=True)
            work = WorkDir(out_dir)
            old = work.read_plan()
            if old is not None and old["fingerprint"] != plan["fingerprint"] and count > 1:
                raise SlideRunMismatch(_mismatch(work, old, plan))
            if old is None or old["fingerprint"] != plan["fingerprint"]:
                t0 = time.perf_counter()
                thumb, tissue_tokens = detect_tissue(reader, size=tuple(plan["size"]), patch=self.patch_size)
                tiles = _grid(plan).tiles_with(tissue_tokens)
                plan["batches"] = [tiles[i : i + self.step.batch].tolist() for i in range(0, len(tiles), self.step.batch)]
                plan["tissue_seconds"] = time.perf_counter() - t0
                work.start(plan, thumb, tissue_tokens)
            else:
                plan = old
            computed = self._compute(reader, plan, work, index, count, progress, progress_position)
        finally:
            if owned:
                reader.close()
        n_tiles = sum(len(b) for b in plan["batches"])
        if count > 1:
            now = work.read_plan()
            if now is None or now["fingerprint"] != plan["fingerprint"]:  # another process replaced the plan
                raise SlideRunMismatch(_mismatch(work, now or {}, plan))
            return SlideResult(reader.path, out_dir, False, n_tiles, computed, time.perf_counter() - t_start)
        summary = merge_slide(out_dir)
        return SlideResult(reader.path, out_dir, True, n_tiles, computed, time.perf_counter() - t_start, summary)

    def _plan(self, reader: Slide) -> dict:
        rp = reader.plan(self.mpp)
        settings = {
            "slide": reader.path.name,
            "slide_bytes": reader.path.stat().st_size,
            "slide_dimensions": list(reader.dimensions),
            "slide_mpp": reader.mpp,
            "target_mpp": self.mpp,
            "mpp": rp.mpp,
            "level": rp.level,
            "scale": rp.scale,
            "size": list(rp.size),
            "patch": self.patch_size,
            "tile": self.tile,
            "margin": self.margin,
            "batch": self.step.batch,
            "k": self.k,
            "resolution": self.resolution,
            "save_weights": self.save_weights,
            "info": self.info,
            "params": self._digest,
        }
        fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        return {
            **settings,
            "slide_path": str(reader.path),
            "backend": reader.backend,
            "fingerprint": fingerprint,
        }

    def _compute(self, reader: Slide, plan: dict, work: WorkDir, index: int, count: int, progress: bool, position: int) -> int:
        from tqdm.auto import tqdm

        grid = _grid(plan)
        rp = reader.plan(self.mpp)
        done = work.done(plan["fingerprint"])
        batches = plan["batches"]
        mine = list(range(index, len(batches), count))
        todo = [b for b in mine if b not in done]
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
            work.put(b, plan["fingerprint"], ids, labels, weights, seconds=now - max(t0, last), read_wait=waited)
            last = time.perf_counter()
            computed += len(ids)
            bar.update(len(ids))

        try:
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


class SlideRunMismatch(ValueError):
    """The processes of a multi-process run (or a run and the work folder it found) disagree on settings."""


def _mismatch(work: WorkDir, old: dict, plan: dict) -> str:
    keys = sorted(k for k in set(old) | set(plan) if k not in ("batches", "tissue_seconds", "fingerprint", "slide_path"))
    differ = [f"{k}: {old.get(k)!r} there, {plan.get(k)!r} here" for k in keys if old.get(k) != plan.get(k)]
    return (
        f"{work.path} holds a slide run with other settings ({'; '.join(differ) or 'other model parameters'}): "
        "every process of a multi-process run must use the same settings (remove that folder to start afresh)"
    )


def _grid(plan: dict) -> TileGrid:
    return TileGrid(
        width=plan["size"][0], height=plan["size"][1], patch=plan["patch"], tile=plan["tile"], margin=plan["margin"]
    )


def _describe_concepts(concepts) -> str:
    """How summary.json names the bank: its path or preset, "array" for an in-memory matrix."""
    if isinstance(concepts, (str, Path)):
        return str(concepts)
    return "array" if hasattr(concepts, "__array__") else repr(concepts)


def merge_slide(out_dir: str | Path, *, max_trace_pixels: int = 2**26) -> dict:
    """Write a slide's outputs from its finished work folder; return the summary (see the module docstring).

    The label map is assembled at the working resolution in a memory map in the work folder and read back
    one band at a time, so memory stays bounded by a band of rows and one batch, whatever the slide's size.
    labels.geojson is traced from the label map sampled every `step` pixels (the top-left pixel of each
    step x step cell; the cells are the pixels of pyramid level log2(step) of labels.ome.tif): at token
    resolution step is the patch size and the polygons are the token edges exactly; at pixel resolution
    step is the smallest power of two that keeps the traced grid within `max_trace_pixels` cells (1 for
    slides up to 8192 x 8192 working pixels), and the cell-edge polygons are simplified (Douglas-Peucker,
    topology kept, valid) with a tolerance of half a cell, so every boundary lies within 1.5 x step working
    pixels of the label map's. summary.json records step and tolerance in working pixels.

    Raises ValueError naming the missing batches when some process has not finished its share.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    work = WorkDir(out_dir)
    plan = work.read_plan()
    if plan is None:
        summary_path = out_dir / "summary.json"
        if summary_path.is_file():
            return json.loads(summary_path.read_text())
        raise ValueError(f"{out_dir}: no slide run to merge (no {work.plan_path.relative_to(out_dir)})")
    fingerprint = plan["fingerprint"]
    batches = plan["batches"]
    missing = sorted(set(range(len(batches))) - work.done(fingerprint))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{out_dir}: {len(missing)} of {len(batches)} batches not computed yet ({shown})")

    grid = _grid(plan)
    p = grid.patch
    k = plan["k"]
    pixel = plan["resolution"] == "pixel"
    width, height = plan["size"]
    dtype = label_dtype(k + 1)
    thumb, tissue_tokens = work.tissue(fingerprint)
    labels = work.label_map((height, width), dtype)
    weights = np.zeros((*grid.tokens_hw, k), np.float32) if plan["save_weights"] else None
    compute_s = read_wait_s = 0.0
    for b in range(len(batches)):
        chunk = work.get(b, fingerprint)
        compute_s += float(chunk["seconds"])
        read_wait_s += float(chunk["read_wait"])
        for j, t in enumerate(chunk["tiles"].tolist()):
            rs, cs = grid.core_slices(t)
            y0, x0 = rs.start * p, cs.start * p
            y1, x1 = min(rs.stop * p, height), min(cs.stop * p, width)
            tile_labels = chunk["labels"][j] if pixel else _expand(chunk["labels"][j], p)
            tissue = _expand(tissue_tokens[rs, cs], p)[: y1 - y0, : x1 - x0]
            labels[y0:y1, x0:x1] = np.where(tissue, tile_labels[: y1 - y0, : x1 - x0] + 1, 0)
            if weights is not None:
                hh, ww = rs.stop - rs.start, cs.stop - cs.start
                weights[rs, cs] = chunk["weights"][j, :hh, :ww]
    labels.flush()
    sample = array_sampler(labels)
    if weights is not None:
        weights[~tissue_tokens] = 0.0

    names = _concept_names(k)
    colors = _palette(k + 1)
    mpp = plan["mpp"]
    if pixel:
        step = 1
        while -(-height // step) * -(-width // step) > max_trace_pixels:
            step *= 2
        tolerance = 0.5
    else:
        step, tolerance = p, 0.0
    # level-0 pixels per traced cell along x and y
    level0 = (plan["slide_dimensions"][0] / width * step, plan["slide_dimensions"][1] / height * step)
    outputs = {
        "labels.ome.tif": lambda path: write_label_tiff(path, sample, size=(width, height), dtype=dtype, mpp=mpp),
        "labels.geojson": lambda path: write_geojson(
            path, sample(np.arange(0, height, step), np.arange(0, width, step)), names=names, colors=colors,
            scale=level0, bounds=plan["slide_dimensions"], tolerance=tolerance,
        ),
        "overlay.png": lambda path: _write_overlay(path, thumb, sample, size=(width, height), names=names, colors=colors),
    }
    if weights is not None:
        token_labels = np.where(tissue_tokens, weights.argmax(-1) + 1, 0).astype(np.int32)
        outputs[WEIGHTS_FILE] = lambda path: write_weights(
            path, {"weights": weights, "labels": token_labels},
            {"mpp": str(mpp), "patch": str(p), "layout": "(h_tokens, w_tokens, k); labels 0 = background, "
             "else 1 + the argmax of the token's weights"},
        )
    # a kill while writing outputs leaves temporaries; a run with other settings may have left weights
    remove_stale_temporaries(out_dir, [*outputs, "summary.json"])
    if weights is None:
        (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    for name, write in outputs.items():
        write(out_dir / name)

    counts = np.zeros(k + 1, np.int64)
    for y in range(0, height, 256):
        counts += np.bincount(np.asarray(labels[y : y + 256]).ravel(), minlength=k + 1)
    del labels, sample  # the memory map's file goes with the work folder
    pixel_mm2 = mpp**2 / 1e6
    tissue = int(counts[1:].sum())
    summary = {
        "slide": plan["slide_path"],
        "backend": plan["backend"],
        "slide_dimensions": plan["slide_dimensions"],
        "slide_mpp": plan["slide_mpp"],
        "mpp": mpp,
        "target_mpp": plan["target_mpp"],
        "level": plan["level"],
        "size": plan["size"],
        **plan["info"],
        "k": k,
        "resolution": plan["resolution"],
        "patch": p,
        "tile": grid.tile,
        "margin": grid.margin,
        "tokens": list(grid.tokens_hw),
        "tiles": {"grid": len(grid), "tissue": sum(len(b) for b in batches)},
        "geojson": {"step_px": step, "tolerance_px": tolerance * step},
        "tissue_area_mm2": tissue * pixel_mm2,
        "labels": {str(v): n for v, n in enumerate(names)},
        "concepts": [
            {
                "label": i + 1,
                "concept": i,
                "name": names[i + 1],
                "color": [int(c) for c in colors[i + 1]],
                "area_mm2": float(counts[i + 1] * pixel_mm2),
                "share_of_tissue": float(counts[i + 1] / tissue) if tissue else 0.0,
            }
            for i in range(k)
        ],
        "timing_s": {
            "tissue": plan["tissue_seconds"],
            "read_wait": read_wait_s,
            "compute": compute_s,
            "write": time.perf_counter() - t0,
        },
        "versions": _versions(),
        "outputs": sorted([*outputs, "summary.json"]),
        "fingerprint": fingerprint,
    }
    write_json(out_dir / "summary.json", summary)
    work.clear()
    return summary


def _expand(tokens_hw: np.ndarray, patch: int) -> np.ndarray:
    """Each token as a patch x patch square of pixels."""
    return np.repeat(np.repeat(tokens_hw, patch, axis=0), patch, axis=1)


def _write_overlay(path: Path, thumb: np.ndarray, sample, *, size: tuple[int, int], names, colors) -> None:
    """The thumbnail with the labels blended in (background left as it is) and a legend of the labels present.

    The thumbnail spans the slide's `size` = (width, height) working pixels; each thumbnail pixel shows the
    label at the working pixel under its centre, from `sample(ys, xs)`.
    """
    from PIL import Image

    from fseg_jax.visualize import overlay

    th, tw = thumb.shape[:2]
    width, height = size
    ys = np.minimum((np.arange(th) + 0.5) * height / th, height - 1).astype(np.intp)
    xs = np.minimum((np.arange(tw) + 0.5) * width / tw, width - 1).astype(np.intp)
    labels_thumb = sample(ys, xs)
    image = overlay(thumb, labels_thumb, legend=True, palette=colors, names=names)
    background = labels_thumb == 0
    image[:th][background] = thumb[background]
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def find_slides(slides: str | Path | Iterable[str | Path]) -> list[Path]:
    """A slide path as a list, the slides and images of a folder (sorted), or a list of paths."""
    if isinstance(slides, (str, Path)):
        p = Path(slides)
        if p.is_dir():
            return sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES and not q.name.startswith("."))
        return [p]
    return [Path(s) for s in slides]


def segment_slides(
    slides: str | Path | Iterable[str | Path],
    out_root: str | Path,
    segmenter: SlideSegmenter,
    *,
    slide_mpp: float | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = False,
    on_result: Callable[[SlideResult | SlideFailure], None] | None = None,
) -> list[SlideResult | SlideFailure]:
    """Segment a slide, a folder of slides or a list of them into `out_root/<slide name>/` each.

    A slide that fails (unreadable, no mpp, settings that differ from a multi-process run's, ...) becomes a
    SlideFailure in the returned list and the batch goes on; `on_result` is called after each slide.
    part: (index, count) of a multi-process run, for every slide (see `SlideSegmenter.run`).
    """
    from tqdm.auto import tqdm

    paths = find_slides(slides)
    out_root = Path(out_root)
    results: list[SlideResult | SlideFailure] = []
    for path in tqdm(paths, desc="slides", unit="slide", disable=not progress or len(paths) < 2, position=0):
        try:
            result = segmenter.run(
                path, out_root / slide_folder_name(path), slide_mpp=slide_mpp, part=part, progress=progress,
                progress_position=1 if len(paths) > 1 else 0,
            )
        except Exception as err:  # noqa: BLE001 - one bad slide must not end the batch; reported to the caller
            result = SlideFailure(path, f"{type(err).__name__}: {err}" if not isinstance(err, SlideError) else str(err))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def slide_folder_name(path: Path) -> str:
    """The output sub-folder of a slide: its file name without the extension (.ome.tif counted whole)."""
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def segment_slide(
    slide: str | Path,
    out_dir: str | Path,
    *,
    model,
    concepts,
    k: int | None = None,
    method: str = "project",
    layer: int | Sequence[int] = -1,
    mpp: float = 0.5,
    slide_mpp: float | None = None,
    tile: int = 1024,
    margin: int | None = None,
    batch: int = 16,
    dtype=None,
    resolution: str = "pixel",
    n_components: int = 20,
    seed: int = 0,
    solver: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    save_weights: bool = False,
    devices: Sequence | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = False,
) -> SlideResult:
    """Segment one whole slide (or plain image) with F-Seg and write its outputs into `out_dir`.

    model: a model object (VisionTransformer, ResNet50), a preset name or a converted-model folder.
    concepts: a ConceptBank, a bank path or preset name (then `k` picks the matrix; it may be left out when
    the bank holds one), or a (k, d) array.
    mpp: working resolution in microns per pixel (0.5 ~ 20x; a pyramid level within 2 % of it is used
    as it is, at its own resolution, which summary.json records); slide_mpp: the slide's own level-0
    resolution when its file does not record it (or records it wrongly). tile: tile side in working
    pixels, a multiple of the patch size; margin: context computed then discarded on each side (default
    tile/16). batch: tiles per compiled step, sharded over `devices` (default: all local devices).
    dtype: "bfloat16" for a bfloat16 forward pass. resolution: "pixel" (F-Seg's per-pixel argmax of the
    bilinearly upsampled weights, continuous across tiles) or "token" (one label per token, faster).
    n_components, seed, solver, tol, max_iter: as for `fseg_jax.segment`. save_weights: also write the
    (h, w, k) token weights. part: (index, count) of a multi-process run (see `SlideSegmenter.run`).

    Outputs in `out_dir`: labels.ome.tif (label 0 = background, i+1 = concept i, pyramidal, physical pixel
    size set), labels.geojson (QuPath annotations in level-0 pixels), overlay.png, summary.json (and
    weights.safetensors). Re-running resumes a killed run; finished outputs are not recomputed.
    """
    segmenter = SlideSegmenter.from_model(
        model, concepts, k=k, method=method, layer=layer, dtype=dtype, n_components=n_components, seed=seed,
        solver=solver, tol=tol, max_iter=max_iter, tile=tile, margin=margin, batch=batch, mpp=mpp,
        resolution=resolution, save_weights=save_weights, devices=devices,
    )
    return segmenter.run(slide, out_dir, slide_mpp=slide_mpp, part=part, progress=progress)
