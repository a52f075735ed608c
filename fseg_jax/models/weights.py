"""The weights manifests of the presets (``weights/<name>.json``, shipped as ``fseg_jax.weights``): each
checkpoint's repository, revision, file, license and layout."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fseg_jax.models.config import preset_names


def _manifest_folder():
    """``weights/`` beside the ``fseg_jax`` package of a source checkout, else the installed ``fseg_jax.weights``.

    The checkout's own folder comes first so that a source tree on ``sys.path`` reads its own manifests even
    where another checkout is installed in editable mode (whose finder maps ``fseg_jax.weights`` to itself).
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "weights" / "__init__.py").is_file():
        return root / "weights"
    return resources.files("fseg_jax.weights")


def read_manifest(name: str) -> dict[str, Any]:
    """The weights manifest of a preset (``weights/<name>.json``, shipped as ``fseg_jax.weights``)."""
    path = _manifest_folder().joinpath(f"{name}.json")
    if not path.is_file():
        raise ValueError(f"no weights manifest for {name!r}; available: {', '.join(preset_names())}")
    return json.loads(path.read_text())


def preset_layout(name: str) -> str:
    """The checkpoint layout of a preset's hub file: the manifest's ``layout`` where it names one
    (``"dinov2_teacher"``), else ``"transformers"`` or ``"timm"`` (timm and torchvision)."""
    manifest = read_manifest(name)
    return manifest.get("layout") or ("transformers" if "transformers" in manifest else "timm")
