"""Loading and saving models: converted directories, and presets fetched from the Hugging Face hub.

A converted model is a directory with ``model.safetensors`` (float32 parameters under their dotted NNX
paths) and ``config.json`` (``{"format": "fseg_jax", "format_version": 1, "model_type": "vit" | "resnet",
"config": {...}}``). ``load_model("uni")`` downloads the checkpoint named in ``weights/uni.json`` at the
revision pinned there, converts it once and keeps the converted files in huggingface_hub's assets cache
(``cached_assets_path("fseg_jax", <preset>, <commit>)``, by default
``~/.cache/huggingface/assets/fseg_jax/<preset>/<commit>/``), so later loads skip both download and conversion,
and a new revision is converted again. Where the hub keeps
its files and whether it is offline is huggingface_hub's to say (its ``constants``, set from ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` ... when it is imported); this module reads no environment variables.

:func:`resolve_model` is what the segmentation front ends call: it takes a model, a preset name or a
directory, keeps the last few loaded models in memory (a notebook loop does not reload a gigabyte per call)
and remembers where each came from (:func:`model_source`), which concept banks record.
"""

from __future__ import annotations

import functools
import json
import os
import weakref
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from fseg_jax._files import atomic_paths
from fseg_jax.convert.checkpoint import SafetensorsCheckpoint, convert_checkpoint, convert_hub_folder, hub_folder_layout
from fseg_jax.convert.engine import NATIVE_RULES, ConversionError, fill_model
from fseg_jax.models.config import ResNetConfig, ViTConfig, config_from_preset, preset_names
from fseg_jax.models.weights import preset_layout, read_manifest

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


MODEL_CACHE_SIZE = 3  # loaded models kept by resolve_model

# model object -> the preset name or absolute directory it was loaded from; the model itself is left untouched
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class ModelAccessError(RuntimeError):
    """The checkpoint of a preset cannot be fetched (gated repository, offline without a cached copy)."""


def save_model(model, directory: str | Path) -> Path:
    """Write ``model`` (a ``VisionTransformer`` or ``ResNet50``) as ``model.safetensors`` + ``config.json``.

    Returns the directory. Parameters are stored as float32 under their dotted NNX paths.
    """
    from safetensors.numpy import save_file

    if not isinstance(model, nnx.Module) or not isinstance(getattr(model, "config", None), (ViTConfig, ResNetConfig)):
        raise TypeError(f"save_model takes a VisionTransformer or ResNet50, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    _, state = nnx.split(model)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    tensors = {".".join(str(p) for p in path): np.asarray(value, np.float32) for path, value in flat.items()}
    meta = {
        "format": "fseg_jax",
        "format_version": FORMAT_VERSION,
        "model_type": "resnet" if isinstance(config, ResNetConfig) else "vit",
        "config": config.to_dict(),
    }
    # both files or neither, the weights renamed into place before the config that points at them
    with atomic_paths(directory / WEIGHTS_FILE, directory / CONFIG_FILE) as (weights, config_file):
        save_file(tensors, str(weights), metadata={"format": "fseg_jax"})
        config_file.write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def _read_config(directory: Path) -> ViTConfig | ResNetConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{directory} is not a converted model: {CONFIG_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"cannot read {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != "fseg_jax":
        raise ConversionError(
            f"{path} is not an fseg_jax config; convert a timm checkpoint first (fseg-jax convert)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    kinds = {"vit": ViTConfig, "resnet": ResNetConfig}
    if meta.get("model_type") not in kinds:
        raise ConversionError(f"{path}: unknown model_type {meta.get('model_type')!r}")
    try:
        return kinds[meta["model_type"]].from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{path}: {err}") from err


def load_converted(directory: str | Path, **model_kwargs):
    """Load a directory written by ``save_model`` (strict: every key, shape and parameter checked)."""
    directory = Path(directory)
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ConversionError(f"{directory} is not a converted model: {WEIGHTS_FILE} is missing")
    try:
        state = SafetensorsCheckpoint(weights)
    except Exception as err:  # safetensors raises several types for a damaged file
        raise ConversionError(f"cannot read {weights}: {type(err).__name__}: {err}") from err
    try:
        model = fill_model(state, config, NATIVE_RULES, **model_kwargs)
    except ConversionError as err:
        raise ConversionError(f"{weights}: {err.summary}", err.problems) from err
    _SOURCES[model] = str(directory.resolve())
    return model


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub resolved it (``huggingface_hub.constants.HF_HUB_CACHE``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def assets_cache_dir() -> Path:
    """huggingface_hub's cache of library assets (``huggingface_hub.constants.HF_ASSETS_CACHE``), where converted
    presets are kept."""
    from huggingface_hub import constants

    return Path(constants.HF_ASSETS_CACHE)


def _login_help(repo: str, license_name: str) -> str:
    return (
        f"{repo} is a gated repository (license {license_name}). To download it: accept its terms at "
        f"https://huggingface.co/{repo} while logged in, then authenticate this machine with "
        "`hf auth login` (or `huggingface-cli login`), or set the HF_TOKEN environment variable."
    )


def download_checkpoint(preset: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
                        token: str | bool | None = None) -> Path:
    """The local path of a preset's hub checkpoint (downloaded if needed; huggingface_hub's offline mode uses the
    cache only)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    manifest = read_manifest(preset)
    repo, filename = manifest["hf_repo"], manifest["filename"]
    revision = revision or manifest["revision"]
    offline = constants.is_offline_mode()
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=str(cache_dir or hub_cache_dir()),
                                    token=token, local_files_only=offline))
    except GatedRepoError as err:
        raise ModelAccessError(_login_help(repo, manifest["license"])) from err
    except RepositoryNotFoundError as err:
        # without a token the hub answers 401 "not found" for gated repositories as well
        raise ModelAccessError(
            f"cannot access {repo}: not found or not authorised. " + _login_help(repo, manifest["license"])
        ) from err
    except LocalEntryNotFoundError as err:
        where = "offline mode (HF_HUB_OFFLINE) is on" if offline else "the hub could not be reached"
        raise ModelAccessError(
            f"{filename} of {repo} (revision {revision}) is not in the cache {cache_dir or hub_cache_dir()} "
            f"and {where}. Download it once online, or pass a converted model directory."
        ) from err
    except HfHubHTTPError as err:
        raise ModelAccessError(f"cannot download {filename} from {repo}: {err}") from err


def load_model(name_or_dir: str | Path, *, revision: str | None = None, cache_dir: str | Path | None = None,
               assets_dir: str | Path | None = None, token: str | bool | None = None, **model_kwargs):
    """A model ready to use: ``VisionTransformer`` or ``ResNet50`` with converted weights.

    Args:
        name_or_dir: a directory written by ``save_model`` / ``fseg-jax convert``; a folder as the hub ships a
            timm or transformers model (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``),
            converted with the rules its ``config.json`` names (timm ``architecture``, transformers
            ``model_type``); or a preset name (``fseg_jax.models.config.preset_names()``).
        revision: hub revision overriding the manifest's pinned one (presets only).
        cache_dir: hub cache (default: :func:`hub_cache_dir`, ``~/.cache/huggingface/hub`` unless configured).
        assets_dir: where converted presets are kept, under ``fseg_jax/<preset>/<commit>`` (default:
            :func:`assets_cache_dir`, ``~/.cache/huggingface/assets`` unless configured).
        token: hub token (default: the logged-in one / HF_TOKEN).
        **model_kwargs: ``dtype`` (compute dtype), ``param_dtype`` (storage dtype of the weights:
            ``jnp.bfloat16`` halves the memory of the large matrices), ``attention_impl`` for ViTs.

    Raises:
        ConversionError: the files do not match the architecture (all problems listed) or are damaged.
        ModelAccessError: the preset's checkpoint cannot be fetched (gated, offline and not cached).
    """
    path = Path(name_or_dir)
    if path.is_dir():
        if hub_folder_layout(path) is None:
            return load_converted(path, **model_kwargs)
        model = convert_hub_folder(path, **model_kwargs)
        _SOURCES[model] = str(path.resolve())
        return model
    from huggingface_hub import cached_assets_path

    name = str(name_or_dir)
    if name not in preset_names():
        raise ValueError(
            f"{name!r} is neither a converted model directory nor a preset ({', '.join(preset_names())})"
        )
    checkpoint = download_checkpoint(name, revision=revision, cache_dir=cache_dir, token=token)
    commit = checkpoint.parent.name  # hub cache layout: .../snapshots/<commit>/<filename>
    converted = cached_assets_path("fseg_jax", namespace=name, subfolder=commit,
                                   assets_dir=assets_dir or assets_cache_dir())
    if not ((converted / WEIGHTS_FILE).is_file() and (converted / CONFIG_FILE).is_file()):
        # the cache keeps the checkpoint's own values, whatever dtype this load stores them in
        full = convert_checkpoint(checkpoint, config_from_preset(name), layout=preset_layout(name))
        save_model(full, converted)  # file by file, atomically, the config last: no half-written cache entry
        del full
    model = load_converted(converted, **model_kwargs)
    _SOURCES[model] = name
    return model


def model_source(model) -> str | None:
    """The preset name or absolute directory ``model`` was loaded from by this process, None if not loaded."""
    try:
        return _SOURCES.get(model)
    except TypeError:  # not weak-referenceable: not a model this module loaded
        return None


def resolve_model(spec, *, dtype=None, **model_kwargs):
    """The model a segmentation call means: a model object as it is, or a preset name / converted directory.

    Names and directories are loaded with :func:`load_model` and kept in memory: the last
    ``MODEL_CACHE_SIZE`` loads (keyed by preset and the hub and assets caches, or by directory and the weights
    file's size and modification time, and by ``model_kwargs`` such as ``attention_impl``) are reused, so calling
    ``segment`` in a loop loads the weights once. A returned model is shared between callers: do not modify it in place.

    Args:
        spec: a ``VisionTransformer`` / ``ResNet50``, a preset name, or a directory written by ``save_model``.
        dtype: compute dtype of the forward pass (e.g. ``jnp.bfloat16``); the parameters are shared with the
            cached model, not copied.
        **model_kwargs: as for :func:`load_model` (``attention_impl``, ``param_dtype``); they apply to models
            loaded here, not to a model object.
    """
    from fseg_jax.models import with_compute_dtype

    if isinstance(spec, (str, os.PathLike)):
        model = _load_cached(_cache_key(spec), tuple(sorted(model_kwargs.items())))
    elif hasattr(spec, "config") and hasattr(spec, "forward_intermediates"):
        model = spec
    else:
        raise TypeError(
            f"model: expected a model, a preset name or a converted model directory, got {type(spec).__name__}"
        )
    if dtype is None:
        return model
    import jax.numpy as jnp

    return with_compute_dtype(model, jnp.dtype(dtype))


def _cache_key(spec: str | os.PathLike) -> tuple:
    path = Path(spec).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        stamp = (weights.stat().st_size, weights.stat().st_mtime_ns) if weights.is_file() else None
        return ("dir", str(path.resolve()), stamp)
    return ("preset", os.fspath(spec), str(hub_cache_dir()), str(assets_cache_dir()))


@functools.lru_cache(maxsize=MODEL_CACHE_SIZE)
def _load_cached(key: tuple, model_kwargs: tuple):
    return load_model(key[1], **dict(model_kwargs))


def clear_model_cache() -> None:
    """Forget the models :func:`resolve_model` keeps in memory (the next call loads from disk again)."""
    _load_cached.cache_clear()


def random_model(preset: str, *, seed: int = 0, depth: int | None = None, **model_kwargs):
    """A model of ``preset``'s architecture with random weights drawn from ``seed``, built in memory.

    ``depth`` keeps only that many blocks (a quicker model for trying the pipeline). Its config is named
    ``<preset>-random`` so that a concept bank built with it does not claim the real weights; its segmentations
    mean nothing. ``model_kwargs`` go to the model's constructor (``param_dtype``, ``attention_impl``).
    """
    return random_model_of(config_from_preset(preset), seed=seed, depth=depth, **model_kwargs)


def random_model_of(config: ViTConfig | ResNetConfig, *, seed: int = 0, depth: int | None = None, **model_kwargs):
    """:func:`random_model` for any architecture config: named ``<config name>-random``, cut to ``depth`` blocks."""
    import dataclasses

    from fseg_jax.models import build_model

    changes = {"name": f"{config.name}-random"}
    if depth is not None:
        if not isinstance(config, ViTConfig):
            raise ValueError(f"depth applies to Vision Transformers; {config.name} is a {type(config).__name__}")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= config.depth:
            raise ValueError(f"depth must be an integer in [1, {config.depth}] for {config.name}, got {depth!r}")
        changes["depth"] = int(depth)
    return build_model(dataclasses.replace(config, **changes), rngs=nnx.Rngs(int(seed)), **model_kwargs)


def model_summary(model) -> dict[str, Any]:
    """Architecture facts of a model (name, patch size, width, depth, parameter count) for display."""
    config = model.config
    _, state = nnx.split(model)
    n_params = sum(int(np.prod(v.shape)) for v in nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)).values())
    return {"name": config.name, "patch_size": config.patch_size, "embed_dim": config.embed_dim,
            "depth": config.depth, "parameters": n_params}
