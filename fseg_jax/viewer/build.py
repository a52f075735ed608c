"""Writing a slide run's viewer: two Deep Zoom pyramids, OpenSeadragon and one index.html, in OUT/<slide>/viewer/.

- ``slide.dzi`` and ``slide_files/``: the slide at the run's working resolution, JPEG tiles;
- ``labels.dzi`` and ``labels_files/``: the label map, PNG tiles whose pixel values are the labels (the page
  colours them, label 0 and the labels switched off transparent);
- ``openseadragon/``: OpenSeadragon (BSD-3-Clause, its LICENSE.txt beside it), so that viewing needs no network;
- ``viewer.json``: what the pyramids are built from (the run's fingerprint, the tiling, the JPEG quality);
- ``index.html``: the page, written last.

Each pyramid level is written into a temporary folder and renamed into place when complete, and the .dzi
descriptors and index.html are written after the levels (temporary file, then rename): a killed run leaves
no pyramid that looks complete, and the next run keeps the levels already in place. A viewer.json that
differs from the current run (another fingerprint, tiling or quality) clears the viewer folder first.
One process writes a viewer folder at a time: it holds a lock on ``.writing.lock`` there, and another process
that would write the same folder meanwhile raises ViewerError instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from fseg_jax.viewer.deepzoom import DeepZoomGeometry, write_if_changed, write_pyramid
from fseg_jax.wsi.outputs import remove_stale_temporaries
from fseg_jax.wsi.reader import SlideError

VIEWER_FOLDER = "viewer"
MANIFEST = "viewer.json"
LOCK = ".writing.lock"
_STATIC = ("openseadragon/openseadragon.min.js", "openseadragon/LICENSE.txt")


class ViewerError(ValueError):
    """A slide output folder the viewer cannot be written for, or a viewer that cannot be served."""


def write_viewer(
    out_dir: str | Path,
    *,
    slide: str | Path | None = None,
    tile_size: int = 254,
    overlap: int = 1,
    quality: int = 90,
    opacity: float = 0.5,
) -> Path:
    """Write the zoomable viewer of the slide run in `out_dir` (the slide's output folder); return its index.html.

    slide: the slide file, default the path summary.json records. tile_size, overlap: of the Deep Zoom
    tiles; quality: of the slide's JPEG tiles; opacity: the overlay's opacity when the page opens. What is
    already written for the same run and settings is kept (see the module docstring). Raises ViewerError
    when the folder holds no finished run, the slide cannot be read, or another process is writing the
    same viewer.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be 1 .. 100, got {quality}")
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity must be 0 .. 1, got {opacity}")
    out_dir = Path(out_dir)
    summary_path = out_dir / "summary.json"
    labels_path = out_dir / "labels.ome.tif"
    if not summary_path.is_file():
        raise ViewerError(f"{out_dir}: no summary.json; a viewer is written for a finished slide run (fseg-jax slide)")
    if not labels_path.is_file():
        raise ViewerError(f"{out_dir}: no labels.ome.tif; run the slide again to write its outputs")
    summary = _read_summary(summary_path)
    width, height = summary["size"]
    geometry = DeepZoomGeometry((int(width), int(height)), tile_size=int(tile_size), overlap=int(overlap))

    folder = out_dir / VIEWER_FOLDER
    built_from = {
        "fingerprint": summary["fingerprint"],
        "size": [geometry.size[0], geometry.size[1]],
        "tile_size": geometry.tile_size,
        "overlap": geometry.overlap,
        "quality": int(quality),
    }
    folder.mkdir(parents=True, exist_ok=True)
    with _writing(folder):
        manifest = _read_manifest(folder)
        if manifest.get("built_from") != built_from:
            _clear(folder)
            manifest = {"built_from": built_from}
        # temporaries of the files written whole that a killed run left (levels: see write_pyramid)
        remove_stale_temporaries(folder, ["index.html", "slide.dzi", "labels.dzi", MANIFEST])
        remove_stale_temporaries(folder / "openseadragon", [Path(name).name for name in _STATIC])
        _write_manifest(folder, manifest)

        if not _complete(folder, "slide", geometry, "jpeg"):
            from fseg_jax.viewer.sources import SlideTiles

            slide_path = Path(slide) if slide is not None else Path(summary["slide"])
            if not slide_path.is_file():
                raise ViewerError(
                    f"{slide_path}: the slide this run segmented is not there; give its current path "
                    "(slide=..., or --slide on the command line)"
                )
            try:
                with SlideTiles(
                    slide_path, geometry, target_mpp=summary["target_mpp"], slide_mpp=summary["slide_mpp"]
                ) as tiles:
                    write_pyramid(
                        folder, "slide", geometry, tiles.level_tiles, fmt="jpeg",
                        save_options={"format": "JPEG", "quality": int(quality)},
                    )
                    manifest = {**manifest, "slide": str(slide_path), "slide_tiles": tiles.source}
            except SlideError as err:
                raise ViewerError(f"cannot cut the viewer's tiles from the slide: {err}") from err
            _write_manifest(folder, manifest)

        from fseg_jax.viewer.sources import LabelTiles

        try:
            with LabelTiles(labels_path, geometry) as labels:
                encoding = labels.encoding
                if not _complete(folder, "labels", geometry, "png"):
                    write_pyramid(folder, "labels", geometry, labels.level_tiles, fmt="png",
                                  save_options={"format": "PNG"})
        except Exception as err:  # noqa: BLE001 - tifffile and its codecs raise several types for a damaged file
            if isinstance(err, OSError) and err.errno is not None:
                raise  # the file system's own error (a full disk, say), which names its file
            named = str(labels_path) in str(err)
            reason = str(err) if named else f"{labels_path}: cannot read the label map ({type(err).__name__}: {err})"
            raise ViewerError(f"{reason}; run the slide again to rewrite it") from err

        static = resources.files("fseg_jax.viewer") / "static"
        for name in _STATIC:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            write_if_changed(folder / name, (static / name).read_bytes())
        page = _page((static / "index.html").read_text(), summary, geometry, encoding, opacity)
        write_if_changed(folder / "index.html", page)
        return folder / "index.html"


_SUMMARY_KEYS = ("size", "fingerprint", "slide", "target_mpp", "slide_mpp", "concepts")  # what the viewer reads from it


def _read_summary(path: Path) -> dict:
    """summary.json of a slide run; ViewerError naming the file when it is not one."""
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ViewerError(f"{path} is not valid JSON ({err}); run the slide again to rewrite it") from None
    missing = [key for key in _SUMMARY_KEYS if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise ViewerError(f"{path} is not a slide run's summary (no {', '.join(missing)}); run the slide again")
    return summary


def legend_entries(summary: dict) -> tuple[str, list[dict]]:
    """("Classes" or "Concepts", the entries the legend lists): summary.json's classes when it has them
    (then the label map's values are classes), else its concepts."""
    kind, entries = ("Classes", summary["classes"]) if "classes" in summary else ("Concepts", summary["concepts"])
    keys = ("label", "name", "color", "area_mm2", "share_of_tissue")
    return kind, [{key: entry[key] for key in keys} for entry in entries]


def _page(template: str, summary: dict, geometry: DeepZoomGeometry, encoding: str, opacity: float) -> str:
    from html import escape

    kind, legend = legend_entries(summary)
    title = Path(str(summary.get("slide", "slide"))).name
    config = {
        "title": title,
        "mpp": summary.get("mpp"),
        "size": list(geometry.size),
        "tile_size": geometry.tile_size,
        "overlap": geometry.overlap,
        "opacity": float(opacity),
        "slide": {"url": "slide_files/", "format": "jpeg"},
        "labels": {"url": "labels_files/", "format": "png", "encoding": encoding},
        "legend_title": kind,
        "legend": legend,
    }
    # inside <script>, "</" would end the element: JSON allows "<\/" for it
    data = json.dumps(config, ensure_ascii=False).replace("</", "<\\/")
    # one pass, so that a placeholder inside the title or the config is left as it is
    values = {"__TITLE__": escape(title), "__CONFIG__": data}
    return re.sub("__TITLE__|__CONFIG__", lambda m: values[m.group()], template)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """Hold the viewer folder's lock (an flock on its LOCK file, released when the process ends, however it
    ends); ViewerError when another process holds it."""
    import fcntl

    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ViewerError(
                f"{folder}: another process is writing this viewer; run again once it has finished"
            ) from None
        yield
    finally:
        os.close(fd)


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, manifest: dict) -> None:
    write_if_changed(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def _complete(folder: Path, name: str, geometry: DeepZoomGeometry, fmt: str) -> bool:
    """Whether pyramid `name` is whole: its descriptor as expected and every level folder in place."""
    dzi = folder / f"{name}.dzi"
    if not dzi.is_file() or dzi.read_text() != geometry.dzi(fmt):
        return False
    return all((folder / f"{name}_files" / str(level)).is_dir() for level in range(geometry.level_count))


def _clear(folder: Path) -> None:
    """Remove a viewer built from something else: descriptors and page first, so nothing looks complete."""
    for name in ("index.html", "slide.dzi", "labels.dzi", MANIFEST):
        (folder / name).unlink(missing_ok=True)
    for name in ("slide_files", "labels_files"):
        shutil.rmtree(folder / name, ignore_errors=True)
