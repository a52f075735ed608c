"""The work folder of a slide run: its plan, finished batches and label map, so that a killed run resumes.

Layout of `<slide out dir>/.fseg-work/`, F the first 12 hex digits of the plan's work fingerprint (that of the
settings that decide what the tiles compute: all but the classes and the bank's description, see
`fseg_jax.wsi.plan.plan_slide`):
    plan.json           what is being computed (settings, fingerprint, tile grid, the batches of tiles)
    tissue.F.npz        thumbnail (h, w, 3) uint8 and token tissue mask (h_tok, w_tok) bool
    batch-000042.F.npz  compressed: tiles (n,) int64, seconds (dispatch to results of the batch), read_wait
                        (seconds spent waiting on reads), process (index, count) of the process that computed
                        it in its run, host (that process's host name); and, from a process that computes a
                        share of a slide split over several (`part`), the batch's labels (n, c p, c p) or
                        (n, c, c) (pixel or token resolution; concept indices, uint8 or uint16) and optional
                        weights (n, c, c, k) float32. A batch file without labels is a one-process run's:
                        its labels are in the maps below, written there before the file.
    labels.raw          the slide's label map at pixel resolution, (height, width) (0 = background, i + 1 =
                        concept i), painted one tile core at a time by a one-process run as each batch
                        finishes and by the merge for the batches that carry labels
    weights.raw         with save_weights: the token weights (h_tok, w_tok, k) float32, painted alike
The maps are memory maps, never held in memory whole; a new map is a new file, so a map another process still
has open is never truncated. Maps of the wrong size, or missing, while batch files without labels rely on
them, make those batches not done (`WorkDir.check_maps` removes their files), so they are computed again.
Every other file is written atomically, so a batch file that exists is complete (a kill may leave a
temporary beside it, which the folder's removal at the end takes away). Several processes (one per host)
may fill the same folder, each writing its own batches; a batch counts as done only for the settings its
name carries, so a process started with other settings can never complete another's run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
from pathlib import Path

import numpy as np

from fseg_jax.wsi.outputs import atomic_path, label_dtype, write_json

WORK_DIR_NAME = ".fseg-work"
LABEL_MAP = "labels.raw"
WEIGHT_MAP = "weights.raw"
_BATCH_RE = re.compile(r"^batch-(\d{6})\.([0-9a-f]{12})\.npz$")


def work_fingerprint(plan: dict) -> str:
    """The fingerprint a plan's tissue and batch files carry: that of its settings without the classes, which
    change only how the finished batches are merged, and without the bank's description (see
    `fseg_jax.wsi.plan.plan_slide`; for a plan that records none, its fingerprint)."""
    return plan.get("work_fingerprint", plan["fingerprint"])


def map_layout(plan: dict) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{file name: (shape, dtype)} of the maps a plan's run paints: the label map and, with save_weights, the
    token weights (see the module docstring)."""
    width, height = plan["size"]
    p, k = plan["patch"], plan["k"]
    layout = {LABEL_MAP: ((height, width), label_dtype(k + 1))}
    if plan["save_weights"]:
        layout[WEIGHT_MAP] = ((-(-height // p), -(-width // p), k), np.dtype(np.float32))
    return layout


class WorkDir:
    """The work folder inside a slide's output folder (see the module docstring)."""

    def __init__(self, slide_out_dir: str | Path):
        self.path = Path(slide_out_dir) / WORK_DIR_NAME

    @property
    def plan_path(self) -> Path:
        return self.path / "plan.json"

    def read_plan(self) -> dict | None:
        try:
            return json.loads(self.plan_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def start(self, plan: dict, thumbnail: np.ndarray, tissue_tokens: np.ndarray) -> None:
        """Begin (or keep, when the fingerprint matches) a run with this plan; a different plan starts afresh.

        Processes of one multi-process run compute the same plan; whichever writes it first, the content is
        the same, and a folder without a plan is never emptied (another process may be filling it). Nor are
        temporaries removed here: they may be another process's batches being written. The caller decides
        whether a different plan may replace the one on disk (see `SlideSegmenter.run`).
        """
        old = self.read_plan()
        if old is not None and old.get("fingerprint") == plan["fingerprint"]:
            return
        if old is not None:
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._tissue_path(work_fingerprint(plan))) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, thumbnail=thumbnail, tissue_tokens=tissue_tokens)
        write_json(self.plan_path, plan)  # last: a plan on disk means the folder is usable

    def replace_plan(self, plan: dict) -> None:
        """Put `plan` in place of the folder's plan of the same work fingerprint, keeping its finished files."""
        write_json(self.plan_path, plan)

    def _tissue_path(self, fingerprint: str) -> Path:
        return self.path / f"tissue.{fingerprint[:12]}.npz"

    def tissue(self, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self._tissue_path(fingerprint)) as z:
            return z["thumbnail"], z["tissue_tokens"]

    def done(self, fingerprint: str) -> set[int]:
        """Indices of the batches finished under the settings with this fingerprint."""
        if not self.path.is_dir():
            return set()
        tag = fingerprint[:12]
        return {int(m.group(1)) for p in self.path.iterdir() if (m := _BATCH_RE.match(p.name)) and m.group(2) == tag}

    def batch_path(self, index: int, fingerprint: str) -> Path:
        return self.path / f"batch-{index:06d}.{fingerprint[:12]}.npz"

    def mapped(self, fingerprint: str) -> set[int]:
        """Indices of the batches finished under this fingerprint whose labels are in the maps: the batch files
        that carry no labels."""
        return {b for b in self.done(fingerprint) if not _carries_labels(self.batch_path(b, fingerprint))}

    def check_maps(self, plan: dict) -> int:
        """Make the batches of `plan` whose labels are in the maps not done (remove their files, so that they
        are computed again) when a map is missing or not of the plan's size; return how many."""
        if self._maps_fit(plan):
            return 0
        key = work_fingerprint(plan)
        lost = self.mapped(key)
        for b in lost:
            self.batch_path(b, key).unlink(missing_ok=True)
        return len(lost)

    def _maps_fit(self, plan: dict) -> bool:
        return all(
            (self.path / name).is_file() and (self.path / name).stat().st_size == math.prod(shape) * dtype.itemsize
            for name, (shape, dtype) in map_layout(plan).items()
        )

    def maps(self, plan: dict) -> tuple[np.memmap, np.memmap | None]:
        """(labels, weights or None) of `plan`'s run (`map_layout`), read-write: the maps on disk while some
        finished batch is in them (after `check_maps`), else new zero-filled ones replacing any earlier."""
        keep = self.check_maps(plan) == 0 and bool(self.mapped(work_fingerprint(plan)))
        maps = [
            np.memmap(self.path / name, dtype=dtype, mode="r+", shape=shape) if keep
            else self._new_map(name, shape, dtype)
            for name, (shape, dtype) in map_layout(plan).items()
        ]
        return maps[0], (maps[1] if len(maps) > 1 else None)

    def label_map(self, shape: tuple[int, int], dtype) -> np.memmap:
        """A new zero-filled (height, width) label map on disk, replacing any earlier one.

        The batch files without labels are removed first: their labels were in the map this one replaces.
        """
        if self.path.is_dir():
            for p in self.path.iterdir():
                if _BATCH_RE.match(p.name) and not _carries_labels(p):
                    p.unlink(missing_ok=True)
        return self._new_map(LABEL_MAP, shape, dtype)

    def _new_map(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        """A new zero-filled map `name` of `shape`: the earlier file is unlinked, not truncated, so a process
        that still maps it keeps its pages."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / name
        path.unlink(missing_ok=True)
        return np.memmap(path, dtype=dtype, mode="w+", shape=shape)

    def put(
        self,
        index: int,
        fingerprint: str,
        tiles,
        labels: np.ndarray | None,
        weights: np.ndarray | None,
        *,
        seconds: float,
        read_wait: float,
        process: tuple[int, int] = (0, 1),
    ) -> None:
        """Save batch `index`; process: (index, count) of the process computing it, recorded with its host.

        labels and weights None: the batch's labels are in the maps (`maps`, flushed before this call).
        """
        arrays = {
            "tiles": np.asarray(tiles, np.int64),
            "seconds": np.float64(seconds),
            "read_wait": np.float64(read_wait),
            "process": np.asarray(process, np.int64),
            "host": np.str_(socket.gethostname()),
        }
        if labels is not None:
            arrays["labels"] = labels
        if weights is not None:
            arrays["weights"] = weights
        with atomic_path(self.batch_path(index, fingerprint)) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

    def get(self, index: int, fingerprint: str) -> dict[str, np.ndarray]:
        with np.load(self.batch_path(index, fingerprint)) as z:
            return {k: z[k] for k in z.files}

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _carries_labels(batch_file: Path) -> bool:
    """Whether a batch file holds its labels (read from the file's index, nothing decompressed)."""
    with np.load(batch_file) as z:
        return "labels" in z.files
