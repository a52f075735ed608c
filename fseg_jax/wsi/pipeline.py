"""Whole-slide F-Seg: tissue detection, tiled sharded compute, resumable, QuPath and OME-TIFF outputs.

For each slide, at a working resolution of `mpp` microns per pixel:

1. a thumbnail is read and its tissue found (Otsu on saturation); the tissue mask is resampled to the
   slide's token grid (one token per patch);
2. the tiles whose core holds tissue are read in a background thread pool, a few batches ahead, and run
   through one compiled step (the model, the concept weights per token, margins cropped, argmax), the
   batch sharded over every local device; each finished batch is saved in the work folder;
3. once every batch is there, the token label map is assembled (label 0 = background, label i+1 =
   concept i) and written: labels.ome.tif, labels.geojson, overlay.png, summary.json and, on request,
   weights.safetensors; then the work folder is removed.

A killed run picks up from its finished batches. With several JAX processes (`jax.distributed`), each
takes every `count`-th batch and writes it to the shared output folder; `merge_slide` then writes the
outputs.
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
    (rounded up to a multiple of the device count); mpp: working microns per pixel; save_weights: also
    keep the (h, w, k) token weights; devices: the devices to shard the batch over (default: all local);
    workers: reader threads (default: one per CPU core, at most 32); info: what to record in summary.json about the model and bank.
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
        self.save_weights = bool(save_weights)
        self.workers = int(workers or min(32, os.cpu_count() or 4))
        self.info = dict(info or {})
        self.step = TileStep(
            fn, params, batch=batch, margin_tokens=grid.margin_tokens, core_tokens=grid.core_tokens,
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
        **kwargs,
    ) -> SlideSegmenter:
        """From a model (object, preset name or folder) and concepts (ConceptBank, path, preset or (k, d) array).

        dtype: compute dtype of the forward pass, e.g. "bfloat16" (default: the model's own, float32); the
        model computes in it (matmuls and attention) while its parameters and LayerNorm statistics stay float32.
        Other keyword arguments as for the constructor.
        """
        import jax.numpy as jnp

        from fseg_jax.models import with_compute_dtype
        from fseg_jax.segmentation import make_token_fn

        dtype = None if dtype is None else jnp.dtype(dtype)
        model_desc = None
        if isinstance(model, (str, Path)):
            from fseg_jax.hub import resolve_model

            model_desc = str(model)
            model = resolve_model(model, dtype=dtype)
        elif dtype is not None:
            model = with_compute_dtype(model, dtype)
        config = model.config
        model_desc = model_desc or getattr(config, "name", type(model).__name__)
        # make_token_fn resolves and checks the bank (path, preset, ConceptBank or array) against the model
        fn, params = make_token_fn(model, concepts, k=k, method=method, layer=layer)
        k = int(params["concepts"].shape[0])
        info = {
            "model": model_desc, "bank": _describe_concepts(concepts), "method": method, "layer": layer,
            "dtype": "float32" if dtype is None else dtype.name,
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

        part: (index, count) of a multi-process run: this process computes batches index, index+count, ...
        and, when count > 1, leaves the outputs to `merge_slide`. Default: jax.process_index/process_count.
        """
        import jax

        t_start = time.perf_counter()
        index, count = part if part is not None else (jax.process_index(), jax.process_count())
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
        done = work.done()
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
            work.put(b, ids, labels, weights, seconds=now - max(t0, last), read_wait=waited)
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



def _grid(plan: dict) -> TileGrid:
    return TileGrid(
        width=plan["size"][0], height=plan["size"][1], patch=plan["patch"], tile=plan["tile"], margin=plan["margin"]
    )


def _describe_concepts(concepts) -> str:
    """How summary.json names the bank: its path or preset, "array" for an in-memory matrix."""
    if isinstance(concepts, (str, Path)):
        return str(concepts)
    return "array" if hasattr(concepts, "__array__") else repr(concepts)


def merge_slide(out_dir: str | Path) -> dict:
    """Write a slide's outputs from its finished work folder; return the summary (see the module docstring).

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
    batches = plan["batches"]
    missing = sorted(set(range(len(batches))) - work.done())
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"{out_dir}: {len(missing)} of {len(batches)} batches not computed yet ({shown})")

    grid = _grid(plan)
    k = plan["k"]
    thumb, tissue_tokens = work.tissue()
    labels = np.zeros(grid.tokens_hw, label_dtype(k + 1))
    weights = np.zeros((*grid.tokens_hw, k), np.float32) if plan["save_weights"] else None
    compute_s = read_wait_s = 0.0
    for b in range(len(batches)):
        chunk = work.get(b)
        compute_s += float(chunk["seconds"])
        read_wait_s += float(chunk["read_wait"])
        for j, t in enumerate(chunk["tiles"].tolist()):
            rs, cs = grid.core_slices(t)
            hh, ww = rs.stop - rs.start, cs.stop - cs.start
            labels[rs, cs] = chunk["labels"][j, :hh, :ww] + 1
            if weights is not None:
                weights[rs, cs] = chunk["weights"][j, :hh, :ww]
    labels[~tissue_tokens] = 0
    if weights is not None:
        weights[~tissue_tokens] = 0.0

    names = _concept_names(k)
    colors = _palette(k + 1)
    mpp = plan["mpp"]
    width, height = plan["size"]
    # level-0 pixels per token along x and y
    level0 = (plan["slide_dimensions"][0] / width * grid.patch, plan["slide_dimensions"][1] / height * grid.patch)
    outputs = {
        "labels.ome.tif": lambda p: write_label_tiff(p, labels, patch=grid.patch, size=(width, height), mpp=mpp),
        "labels.geojson": lambda p: write_geojson(
            p, labels, names=names, colors=colors, scale=level0, bounds=plan["slide_dimensions"]
        ),
        "overlay.png": lambda p: _write_overlay(
            p, thumb, labels, size=(width, height), patch=grid.patch, names=names, colors=colors
        ),
    }
    if weights is not None:
        outputs[WEIGHTS_FILE] = lambda p: write_weights(
            p, {"weights": weights, "labels": labels.astype(np.int32)},
            {"mpp": str(mpp), "patch": str(grid.patch), "layout": "(h_tokens, w_tokens, k); labels 0 = background"},
        )
    # a kill while writing outputs leaves temporaries; a run with other settings may have left weights
    remove_stale_temporaries(out_dir, [*outputs, "summary.json"])
    if weights is None:
        (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    for name, write in outputs.items():
        write(out_dir / name)

    # areas count the part of each token inside the slide (the last row and column may overhang it)
    h_tok, w_tok = grid.tokens_hw
    inside_y = np.clip(height - np.arange(h_tok) * grid.patch, 0, grid.patch) / grid.patch
    inside_x = np.clip(width - np.arange(w_tok) * grid.patch, 0, grid.patch) / grid.patch
    inside = np.outer(inside_y, inside_x)
    token_mm2 = (grid.patch * mpp) ** 2 / 1e6
    counts = np.bincount(labels.ravel(), weights=inside.ravel(), minlength=k + 1)
    tissue = float(inside[tissue_tokens].sum())
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
        "patch": grid.patch,
        "tile": grid.tile,
        "margin": grid.margin,
        "tokens": list(grid.tokens_hw),
        "tiles": {"grid": len(grid), "tissue": sum(len(b) for b in batches)},
        "tissue_area_mm2": tissue * token_mm2,
        "labels": {str(v): n for v, n in enumerate(names)},
        "concepts": [
            {
                "label": i + 1,
                "concept": i,
                "name": names[i + 1],
                "color": [int(c) for c in colors[i + 1]],
                "area_mm2": float(counts[i + 1] * token_mm2),
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
        "fingerprint": plan["fingerprint"],
    }
    write_json(out_dir / "summary.json", summary)
    work.clear()
    return summary


def _write_overlay(
    path: Path, thumb: np.ndarray, labels_hw: np.ndarray, *, size: tuple[int, int], patch: int, names, colors
) -> None:
    """The thumbnail with the labels blended in (background left as it is) and a legend of the labels present.

    The thumbnail spans the slide's `size` = (width, height) working pixels; labels_hw has one label per
    `patch` x `patch` working pixels (its grid overhangs the slide by under one token).
    """
    from PIL import Image

    from fseg_jax.visualize import overlay

    # thumbnail pixel centre -> working pixel -> token
    th, tw = thumb.shape[:2]
    h_tok, w_tok = labels_hw.shape
    width, height = size
    ys = np.minimum((np.arange(th) + 0.5) * height / th // patch, h_tok - 1).astype(np.intp)
    xs = np.minimum((np.arange(tw) + 0.5) * width / tw // patch, w_tok - 1).astype(np.intp)
    labels_thumb = labels_hw[ys[:, None], xs[None, :]]
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

    A slide that fails (unreadable, no mpp, ...) becomes a SlideFailure in the returned list and the
    batch goes on; `on_result` is called after each slide.
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
    save_weights: bool = False,
    devices: Sequence | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = False,
) -> SlideResult:
    """Segment one whole slide (or plain image) with F-Seg and write its outputs into `out_dir`.

    model: a model object (VisionTransformer, ResNet50), a preset name or a converted-model folder.
    concepts: a ConceptBank, a bank path or preset name (then `k` picks the matrix), or a (k, d) array.
    mpp: working resolution in microns per pixel (0.5 ~ 20x; a pyramid level within 2 % of it is used
    as it is, at its own resolution, which summary.json records); slide_mpp: the slide's own level-0
    resolution when its file does not record it (or records it wrongly). tile: tile side in working
    pixels, a multiple of the patch size; margin: context computed then discarded on each side (default
    tile/16). batch: tiles per compiled step, sharded over `devices` (default: all local devices).
    dtype: "bfloat16" for a bfloat16 forward pass. save_weights: also write the (h, w, k) token weights.

    Outputs in `out_dir`: labels.ome.tif (label 0 = background, i+1 = concept i, pyramidal, physical pixel
    size set), labels.geojson (QuPath annotations in level-0 pixels), overlay.png, summary.json (and
    weights.safetensors). Re-running resumes a killed run; finished outputs are not recomputed.
    """
    segmenter = SlideSegmenter.from_model(
        model, concepts, k=k, method=method, layer=layer, dtype=dtype, tile=tile, margin=margin, batch=batch,
        mpp=mpp, save_weights=save_weights, devices=devices,
    )
    return segmenter.run(slide, out_dir, slide_mpp=slide_mpp, part=part, progress=progress)
