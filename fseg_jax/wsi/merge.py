"""Writing a slide run's outputs from its finished batches: the label map, its areas and summary.json.

The label map (label 0 = background, i.e. pixels of tokens without tissue; label i+1 = concept i) and the token
weights are memory maps in the work folder at the working resolution, painted one tile core at a time by one
painter (`SlideCanvas`): a one-process run paints each batch as it finishes, the merge paints the batches that
processes of a split slide saved with their labels. The map is then written as labels.ome.tif (band by band,
with the labels' names), labels.geojson (traced from it), overlay.png, summary.json (the settings, the area of
each concept, timings, versions and which process computed how many tiles) and, on request,
weights.safetensors; then the work folder is removed.

A run with classes (a bank that names its concepts, see `ConceptBank.classes`) writes classes where a run
without writes concepts: label j+1 = class j in labels.ome.tif, labels.geojson and overlay.png, each named
and coloured as the bank says, and summary.json adds the area of each class. The concept map is mapped
to classes as it is read, so the classes change the merge only.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from fseg_jax.concepts.names import ConceptClasses, default_name
from fseg_jax.visualize import BACKGROUND, palette
from fseg_jax.wsi.outputs import (
    label_dtype,
    label_names,
    remove_stale_temporaries,
    write_geojson,
    write_json,
    write_label_tiff,
    write_weights,
)
from fseg_jax.wsi.lock import hold_folder
from fseg_jax.wsi.overlay import write_overlay
from fseg_jax.wsi.plan import plan_grid
from fseg_jax.wsi.sampling import array_sampler, expand_tokens, mapped_sampler
from fseg_jax.wsi.store import WorkDir, map_layout, work_fingerprint

OUTPUT_FILES = ("labels.ome.tif", "labels.geojson", "overlay.png", "summary.json")
WEIGHTS_FILE = "weights.safetensors"


def slide_classes(classes: ConceptClasses) -> dict:
    """How a slide run's plan records its classes: {"names": [...], "concepts": [[concept, ...], ...],
    "colors": [[r, g, b], ...]}, a class without a colour of its own in its first concept's slide colour
    (concept i is drawn in ``palette(k)[i]``, as in every output)."""
    colors = classes.rgb(palette(classes.k))
    return {
        "names": list(classes.names),
        "concepts": [list(members) for members in classes.concepts],
        "colors": colors.tolist(),
    }


def _written_labels(k: int, classes: dict | None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, (n, 3) uint8 colours, lut) of the labels a run writes, n of them, and the (k + 1,) table from
    the concept map's labels to them: concepts as they are without classes, else label j + 1 = class j
    (`slide_classes`); 0 = background either way."""
    if classes is None:
        names = ["background", *(default_name(i) for i in range(k))]
        return names, np.asarray([BACKGROUND, *palette(k)], np.uint8), np.arange(k + 1, dtype=label_dtype(k + 1))
    names = ["background", *classes["names"]]
    lut = np.zeros(k + 1, label_dtype(len(names)))
    for j, members in enumerate(classes["concepts"]):
        lut[np.asarray(members) + 1] = j + 1
    return names, np.asarray([BACKGROUND, *classes["colors"]], np.uint8), lut


class SlideCanvas:
    """The label map and token weights of a slide run (`WorkDir.maps`), painted one batch of tiles at a time:
    by a one-process run as each batch finishes, and by the merge for the batches whose files carry labels.

    labels: (height, width) memory map, 0 = background (pixels of tokens without tissue), i + 1 = concept i;
    weights: (h_tok, w_tok, k) float32 memory map, 0 on tokens without tissue, or None without save_weights;
    tissue_tokens: (h_tok, w_tok) bool; thumbnail: the slide's (h, w, 3) uint8 thumbnail the tissue was found on.
    """

    def __init__(self, work: WorkDir, plan: dict):
        self.grid = plan_grid(plan)
        self.pixel = plan["resolution"] == "pixel"
        self.width, self.height = plan["size"]
        self.thumbnail, self.tissue_tokens = work.tissue(work_fingerprint(plan))
        self.labels, self.weights = work.maps(plan)

    def paint(self, tiles, labels: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Paint the cores of a batch of tiles: labels (n, c p, c p) or (n, c, c) concept indices (pixel or
        token resolution), weights (n, c, c, k) when the run keeps them (c: core tokens a side)."""
        p = self.grid.patch
        for j, t in enumerate(np.asarray(tiles).tolist()):
            rs, cs = self.grid.core_slices(t)
            y0, x0 = rs.start * p, cs.start * p
            y1, x1 = min(rs.stop * p, self.height), min(cs.stop * p, self.width)
            shape = (y1 - y0, x1 - x0)
            tile = labels[j]
            tile_labels = tile[: shape[0], : shape[1]] if self.pixel else expand_tokens(tile, p, shape)
            tissue_tokens = self.tissue_tokens[rs, cs]
            tissue = expand_tokens(tissue_tokens, p, shape)
            self.labels[y0:y1, x0:x1] = np.where(tissue, tile_labels + 1, 0)
            if self.weights is not None:
                hh, ww = rs.stop - rs.start, cs.stop - cs.start
                self.weights[rs, cs] = np.where(tissue_tokens[..., None], weights[j, :hh, :ww], 0.0)

    def flush(self) -> None:
        """Write what was painted to disk."""
        self.labels.flush()
        if self.weights is not None:
            self.weights.flush()


def merge_slide(out_dir: str | Path, *, max_trace_pixels: int = 2**26, wait: bool = False) -> dict:
    """Write a slide's outputs from its finished work folder; return the summary (see the module docstring).

    The batches whose files carry their labels are painted into the work folder's maps (`SlideCanvas`; the
    others are there already), which are read back one band at a time, so memory stays bounded by a band of
    rows, one batch and the token grid's labels, whatever the slide's size.
    labels.geojson is traced from the label map sampled every `step` pixels (the top-left pixel of each
    step x step cell; the cells are the pixels of pyramid level log2(step) of labels.ome.tif): at token
    resolution step is the patch size and the polygons are the token edges exactly; at pixel resolution
    step is the smallest power of two that keeps the traced grid within `max_trace_pixels` cells (1 for
    slides up to 8192 x 8192 working pixels), and the cell-edge polygons are simplified (Douglas-Peucker,
    topology kept, valid) with a tolerance of half a cell, so every boundary lies within 1.5 x step working
    pixels of the label map's. summary.json records step and tolerance in working pixels.

    The folder is held while it is written (`fseg_jax.wsi.lock.hold_folder`): another run there is a
    FolderBusy error, or with `wait` is waited for. Raises ValueError naming the missing batches when some
    process has not finished its share, or when the maps that held finished batches are missing or not of
    the slide's size (those batches are then no longer done: the next run computes them).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: no slide run to merge (no such folder)")
    with hold_folder(out_dir, wait=wait):
        return _merge_held(out_dir, max_trace_pixels)


def _merge_held(out_dir: Path, max_trace_pixels: int) -> dict:
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    work = WorkDir(out_dir)
    plan = work.read_plan()
    if plan is None:
        summary_path = out_dir / "summary.json"
        if summary_path.is_file():
            return json.loads(summary_path.read_text())
        raise ValueError(f"{out_dir}: no slide run to merge (no {work.plan_path.relative_to(out_dir)})")
    work_key = work_fingerprint(plan)
    batches = plan["batches"]
    lost = work.check_maps(plan)
    missing = sorted(set(range(len(batches))) - work.done(work_key))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        lost_why = (
            f"; {lost} of them had their labels in the maps of {work.path} ({', '.join(map_layout(plan))}), one "
            "missing or not of the slide's size: run the slide again to compute them anew"
        ) if lost else ""
        raise ValueError(f"{out_dir}: {len(missing)} of {len(batches)} batches not computed yet ({shown}{lost_why})")

    canvas = SlideCanvas(work, plan)
    compute_s = read_wait_s = 0.0
    computed_by: dict[tuple, int] = {}
    for b in range(len(batches)):
        chunk = work.get(b, work_key)
        compute_s += float(chunk["seconds"])
        read_wait_s += float(chunk["read_wait"])
        if "process" in chunk:  # batches of older versions do not say
            who = (str(chunk["host"]), *map(int, chunk["process"]))
            computed_by[who] = computed_by.get(who, 0) + len(chunk["tiles"])
        if "labels" in chunk:  # else its labels are in the maps already
            canvas.paint(chunk["tiles"], chunk["labels"], chunk.get("weights"))
    canvas.flush()
    timing = {"tissue": plan["tissue_seconds"], "read_wait": read_wait_s, "compute": compute_s}
    summary = _write_outputs(
        out_dir, plan, canvas.labels, thumb=canvas.thumbnail, tissue_tokens=canvas.tissue_tokens,
        weights=canvas.weights, timing=timing, t0=t0, max_trace_pixels=max_trace_pixels,
        computed_by=[
            {"host": host, "process": index, "processes": count, "tiles": tiles}
            for (host, index, count), tiles in sorted(computed_by.items())
        ],
    )
    del canvas  # the memory maps' files go with the work folder
    work.clear()
    return summary


def remerge_slide(out_dir: str | Path, *, max_trace_pixels: int = 2**26) -> dict | None:
    """Write a finished run's outputs anew for the work folder's plan, computing no tile; return the summary.

    The finished run is one without classes whose tiles the plan computes alike (its summary's
    work_fingerprint is the plan's), so its labels.ome.tif holds the concept map (0 = background, i + 1 =
    concept i), which is read back into the work folder one TIFF tile at a time, then written out with the
    plan's classes and settings as `merge_slide` does. summary.json is removed before the first output is
    replaced, so a run stopped on the way leaves no finished run behind (the next one computes the tiles).
    Its weights file, when there is one, stays: the weights do not depend on the classes. None, with every
    file left as it was, when there is no such finished run or its labels.ome.tif is missing or is not its
    concept map (another size or dtype, other label names, a label beyond k): the tiles must be computed.
    The concept map is read into a new label map (`WorkDir.label_map`), so finished batches whose labels were
    in the one it replaces are computed again.
    """
    import tifffile

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    work = WorkDir(out_dir)
    plan = work.read_plan()
    summary_path = out_dir / "summary.json"
    labels_path = out_dir / "labels.ome.tif"
    previous = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if plan is None or previous.get("work_fingerprint") != work_fingerprint(plan) or "classes" in previous:
        return None
    k = plan["k"]
    width, height = plan["size"]
    names = dict(enumerate(_written_labels(k, None)[0]))
    try:
        if not labels_path.is_file() or label_names(labels_path) != names:
            return None
        with tifffile.TiffFile(labels_path) as tif:
            page = tif.pages[0]
            if page.shape != (height, width) or page.dtype != label_dtype(k + 1):
                return None
            labels = work.label_map((height, width), page.dtype)
            for segment, (_, _, y, x, _), _ in page.segments():
                if segment is not None:
                    tile = segment[0, :, :, 0][: height - y, : width - x]
                    if tile.size and int(tile.max()) > k:
                        return None
                    labels[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    except (OSError, ValueError):  # unreadable: not a finished run's label map
        return None
    labels.flush()
    thumb, tissue_tokens = work.tissue(work_fingerprint(plan))
    summary_path.unlink()
    timing = {**{key: previous["timing_s"][key] for key in ("read_wait", "compute")}, "tissue": plan["tissue_seconds"]}
    summary = _write_outputs(
        out_dir, plan, labels, thumb=thumb, tissue_tokens=tissue_tokens, weights=None, timing=timing, t0=t0,
        max_trace_pixels=max_trace_pixels, keep_weights=plan["save_weights"], computed_by=previous.get("computed_by"),
    )
    del labels  # the memory map's file goes with the work folder
    work.clear()
    return summary


def _write_outputs(
    out_dir: Path,
    plan: dict,
    labels: np.memmap,
    *,
    thumb: np.ndarray,
    tissue_tokens: np.ndarray,
    weights: np.ndarray | None,
    timing: dict[str, float],
    t0: float,
    max_trace_pixels: int,
    keep_weights: bool = False,
    computed_by: list[dict] | None = None,
) -> dict:
    """Write the outputs of `plan`'s run from its concept label map `labels` (0 = background, i + 1 = concept
    i), summary.json last; return the summary. weights: the token weights to write, or None (then
    keep_weights: the weights file already there is this run's; else it is removed). computed_by: which
    process (host, index and count in its run) computed how many tiles, when the batches record it."""
    grid = plan_grid(plan)
    p = grid.patch
    k = plan["k"]
    pixel = plan["resolution"] == "pixel"
    width, height = plan["size"]
    concept_sample = array_sampler(labels)
    classes = plan.get("classes")
    names, colors, lut = _written_labels(k, classes)
    sample = mapped_sampler(concept_sample, lut)
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
        "labels.ome.tif": lambda path: write_label_tiff(
            path, sample, size=(width, height), dtype=lut.dtype, mpp=mpp, names=names
        ),
        "labels.geojson": lambda path: write_geojson(
            path, sample(np.arange(0, height, step), np.arange(0, width, step)), names=names, colors=colors,
            scale=level0, bounds=plan["slide_dimensions"], tolerance=tolerance,
        ),
        "overlay.png": lambda path: write_overlay(path, thumb, sample, size=(width, height), names=names, colors=colors),
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
    if weights is None and not keep_weights:
        (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
    for name, write in outputs.items():
        write(out_dir / name)
    written = sorted([*outputs, *([WEIGHTS_FILE] if keep_weights else []), "summary.json"])

    counts = np.zeros(k + 1, np.int64)
    for y in range(0, height, 256):
        counts += np.bincount(np.asarray(labels[y : y + 256]).ravel(), minlength=k + 1)
    pixel_mm2 = mpp**2 / 1e6
    tissue = int(counts[1:].sum())

    def area(pixels) -> dict:
        return {"area_mm2": float(pixels * pixel_mm2), "share_of_tissue": float(pixels / tissue) if tissue else 0.0}

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
        "tiles": {"grid": len(grid), "tissue": sum(len(b) for b in plan["batches"])},
        "geojson": {"step_px": step, "tolerance_px": tolerance * step},
        "tissue_area_mm2": tissue * pixel_mm2,
        "labels": {str(v): n for v, n in enumerate(names)},
        "concepts": [
            {
                "label": int(lut[i + 1]),
                "concept": i,
                "name": default_name(i),
                "color": [int(c) for c in colors[lut[i + 1]]],
                **area(counts[i + 1]),
                **({} if classes is None else {"class": names[lut[i + 1]]}),
            }
            for i in range(k)
        ],
        **({} if classes is None else {"classes": [
            {
                "label": j + 1,
                "name": name,
                "color": [int(c) for c in colors[j + 1]],
                "concepts": list(members),
                **area(sum(int(counts[i + 1]) for i in members)),
            }
            for j, (name, members) in enumerate(zip(classes["names"], classes["concepts"]))
        ]}),
        "timing_s": {**timing, "write": time.perf_counter() - t0},
        **({"computed_by": computed_by} if computed_by else {}),
        "versions": _versions(),
        "outputs": written,
        "fingerprint": plan["fingerprint"],
        "work_fingerprint": work_fingerprint(plan),
    }
    write_json(out_dir / "summary.json", summary)
    return summary


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
