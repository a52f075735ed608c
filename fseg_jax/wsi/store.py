"""The work folder of a slide run: its plan and finished batches, so that a killed run resumes.

Layout of `<slide out dir>/.fseg-work/`:
    plan.json         what is being computed (settings, fingerprint, tile grid, the batches of tiles)
    tissue.npz        thumbnail (h, w, 3) uint8 and token tissue mask (h_tok, w_tok) bool
    batch-000042.npz  tiles (n,) int64, labels (n, c, c) int32, optional weights (n, c, c, k) float32,
                      seconds (dispatch to results of the batch), read_wait (seconds spent waiting on reads)
Every file is written atomically, so a batch file that exists is complete (a kill may leave a temporary
beside it, which the folder's removal at the end takes away). Several processes (one per host) may fill
the same folder, each writing its own batches.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from fseg_jax.wsi.outputs import atomic_path, write_json

WORK_DIR_NAME = ".fseg-work"
_BATCH_RE = re.compile(r"^batch-(\d{6})\.npz$")


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
        temporaries removed here: they may be another process's batches being written.
        """
        old = self.read_plan()
        if old is not None and old.get("fingerprint") == plan["fingerprint"]:
            return
        if old is not None:
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path / "tissue.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, thumbnail=thumbnail, tissue_tokens=tissue_tokens)
        write_json(self.plan_path, plan)  # last: a plan on disk means the folder is usable

    def tissue(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / "tissue.npz") as z:
            return z["thumbnail"], z["tissue_tokens"]

    def done(self) -> set[int]:
        if not self.path.is_dir():
            return set()
        return {int(m.group(1)) for p in self.path.iterdir() if (m := _BATCH_RE.match(p.name))}

    def batch_path(self, index: int) -> Path:
        return self.path / f"batch-{index:06d}.npz"

    def put(
        self, index: int, tiles, labels: np.ndarray, weights: np.ndarray | None, *, seconds: float, read_wait: float
    ) -> None:
        arrays = {
            "tiles": np.asarray(tiles, np.int64),
            "labels": labels,
            "seconds": np.float64(seconds),
            "read_wait": np.float64(read_wait),
        }
        if weights is not None:
            arrays["weights"] = weights
        with atomic_path(self.batch_path(index)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

    def get(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.batch_path(index)) as z:
            return {k: z[k] for k in z.files}

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
