"""Planning a slide run and resuming it: the settings and their fingerprint, the work folder, what is done.

A run's plan (plan.json in the work folder, see `fseg_jax.wsi.store`) records every setting that changes
its outputs, the slide's geometry and the batches of tiles with tissue; its fingerprint is the hash of the
settings. A batch file counts only for the work fingerprint its name carries (the hash of the settings that
decide the tiles' concept weights: all but the classes, which change only the merge, and the bank's entry in
the info, its path or description, names included), so a run resumes exactly the work done under its own
settings, and a run whose concepts were named (or renamed) since, or whose bank was saved elsewhere, merges
the finished batches anew (or a finished run's concept map, see `fseg_jax.wsi.merge.remerge_slide`). The
model and the concepts enter the settings as digests of what is computed with: the converted model's files
(for a model loaded from a folder) or every parameter value, and the concept matrix actually used.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fseg_jax.wsi.reader import Slide
from fseg_jax.wsi.store import WorkDir, map_layout, work_fingerprint
from fseg_jax.wsi.tiling import TileGrid
from fseg_jax.wsi.tissue import detect_tissue

# plan entries that are not settings: they follow from the settings or describe the machine that ran them
_NOT_SETTINGS = ("batches", "tissue_seconds", "fingerprint", "work_fingerprint", "slide_path", "backend")


class SlideRunMismatch(ValueError):
    """The processes of a multi-process run (or a run and the work folder it found) disagree on settings."""


def tree_digest(tree) -> str:
    """sha256 of a tree of arrays: every leaf's path, shape, dtype and every one of its values."""
    import jax

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(a.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def model_digest(model) -> str:
    """What a model computes with: the sha256 of its converted files when it was loaded from a folder
    (`fseg_jax.hub.model_source`), else `tree_digest` of its parameters (each value hashed once). A preset
    is hashed by its parameters: its recorded source names no hub revision."""
    from flax import nnx

    from fseg_jax.hub import CONFIG_FILE, WEIGHTS_FILE, model_source

    source = model_source(model)
    files = [Path(source) / name for name in (CONFIG_FILE, WEIGHTS_FILE)] if source is not None else []
    if not files or not all(f.is_file() for f in files):  # a preset (any revision) or a folder since removed
        return tree_digest(nnx.state(model))
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            h.update(f"{path.name}:{hashlib.file_digest(f, 'sha256').hexdigest()}".encode())
    return h.hexdigest()


def plan_slide(reader: Slide, mpp: float, settings: dict[str, Any]) -> dict:
    """The plan of a run over `reader` at `mpp` microns per pixel with the segmenter's `settings`, fingerprinted.

    The batches are left out: `start_or_resume` adds them once the tissue is known. The work fingerprint
    leaves out the settings' "classes" and the "bank" entry of their "info" (the concepts' values are in
    "params"); without either it equals the fingerprint.
    """
    rp = reader.plan(mpp)
    plan = {
        "slide": reader.path.name,
        "slide_bytes": reader.path.stat().st_size,
        "slide_dimensions": list(reader.dimensions),
        "slide_mpp": reader.mpp,
        "target_mpp": mpp,
        "mpp": rp.mpp,
        "level": rp.level,
        "scale": rp.scale,
        "size": list(rp.size),
        **settings,
    }
    work = {key: value for key, value in plan.items() if key != "classes"}
    if "bank" in work.get("info", {}):
        work["info"] = {key: value for key, value in work["info"].items() if key != "bank"}
    return {
        **plan, "slide_path": str(reader.path.resolve()), "backend": reader.backend, "fingerprint": _digest(plan),
        "work_fingerprint": _digest(work),
    }


def _digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def plan_grid(plan: dict) -> TileGrid:
    """The tile grid a plan covers."""
    return TileGrid(
        width=plan["size"][0], height=plan["size"][1], patch=plan["patch"], tile=plan["tile"], margin=plan["margin"]
    )


def finished_summary(out_dir: Path, fingerprint: str) -> dict | None:
    """The summary.json of a run with this fingerprint that has written its outputs, or None."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("fingerprint") == fingerprint else None


def start_or_resume(work: WorkDir, reader: Slide, plan: dict, *, batch: int, shared: bool) -> tuple[dict, str | None]:
    """(the plan the work folder holds for these settings, or a new one started there; what it replaced).

    A plan that differs from the folder's in its classes only takes its place and keeps its finished
    batches. A new plan finds the tissue, groups the tiles with tissue into batches of `batch` and replaces
    whatever run the folder held, unless it is `shared` by the processes of a multi-process run: a folder
    holding other settings is then a `SlideRunMismatch`. What it replaced is said in one sentence (the
    settings that differ and the batches discarded), None when it replaced nothing: a run never discards
    another's work without saying so. A resumed run whose finished batches have their labels in a label map
    that is missing or of another size counts them as not done (`WorkDir.check_maps`), and says so too.
    """
    old = work.read_plan()
    if old is not None and old["fingerprint"] == plan["fingerprint"]:
        return old, _lost_batches(work, old)
    if old is not None and not shared and work_fingerprint(old) == plan["work_fingerprint"]:
        plan = {**plan, "batches": old["batches"], "tissue_seconds": old["tissue_seconds"]}
        work.replace_plan(plan)
        return plan, _lost_batches(work, plan)
    if old is not None and shared:
        raise SlideRunMismatch(mismatch_message(work, old, plan))
    replaced = None
    if old is not None:
        done = len(work.done(work_fingerprint(old)))
        replaced = (
            f"discarded the unfinished work of a run with other settings ({_differences(old, plan)}; "
            f"{done} of {len(old.get('batches', []))} batches computed)"
        )
    t0 = time.perf_counter()
    thumb, tissue_tokens = detect_tissue(reader, size=tuple(plan["size"]), patch=plan["patch"])
    tiles = plan_grid(plan).tiles_with(tissue_tokens)
    plan = {
        **plan,
        "batches": [tiles[i : i + batch].tolist() for i in range(0, len(tiles), batch)],
        "tissue_seconds": time.perf_counter() - t0,
    }
    work.start(plan, thumb, tissue_tokens)
    return plan, replaced


def _lost_batches(work: WorkDir, plan: dict) -> str | None:
    """Check the maps of a resumed run (`WorkDir.check_maps`); say what that discarded, or None."""
    lost = work.check_maps(plan)
    if not lost:
        return None
    return (
        f"discarded {lost} finished batches whose labels were in the maps of {work.path} "
        f"({', '.join(map_layout(plan))}), one missing or not of the slide's size (they are computed again)"
    )


def check_unchanged(work: WorkDir, plan: dict) -> None:
    """SlideRunMismatch when another process has replaced `plan` in the shared work folder."""
    now = work.read_plan()
    if now is None or now["fingerprint"] != plan["fingerprint"]:
        raise SlideRunMismatch(mismatch_message(work, now or {}, plan))


def batches_to_do(plan: dict, work: WorkDir, part: tuple[int, int]) -> tuple[list[int], list[int]]:
    """(this process's batches, those of them not finished yet) for `part` = (index, count)."""
    index, count = part
    done = work.done(work_fingerprint(plan))
    mine = list(range(index, len(plan["batches"]), count))
    return mine, [b for b in mine if b not in done]


def mismatch_message(work: WorkDir, old: dict, plan: dict) -> str:
    return (
        f"{work.path} holds a slide run with other settings ({_differences(old, plan)}): "
        "every process of a multi-process run must use the same settings (remove that folder to start afresh)"
    )


def _differences(old: dict, plan: dict) -> str:
    """The settings in which two plans differ, "key: old there, new here; ..."."""
    keys = sorted(k for k in set(old) | set(plan) if k not in _NOT_SETTINGS)
    differ = [f"{k}: {old.get(k)!r} there, {plan.get(k)!r} here" for k in keys if old.get(k) != plan.get(k)]
    return "; ".join(differ) or "other model parameters"
