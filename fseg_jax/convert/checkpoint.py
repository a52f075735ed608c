"""Reading the checkpoint files the Hugging Face hub ships: ``model.safetensors`` and ``pytorch_model.bin``.

A checkpoint is converted with the rules of its layout: ``"timm"`` (timm / torchvision state dicts,
``fseg_jax.convert.timm``) or ``"transformers"`` (``ViTModel`` / ``Dinov2Model``, ``fseg_jax.convert.hf``).
A hub folder says which by its ``config.json``: timm writes ``architecture`` (+ ``model_args``), transformers
``model_type`` and ``architectures`` (:func:`convert_hub_folder`).

Safetensors files are read lazily, one tensor per access, with numpy only (no torch): converting a
checkpoint then needs about the model's size plus one tensor. ``pytorch_model.bin`` (a torch zip) needs
torch (the ``convert`` extra) and is loaded with ``weights_only=True`` (no arbitrary pickles), memory-mapped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from fseg_jax.convert.engine import ConversionError


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsCheckpoint(Mapping):
    """A read-only {name: numpy array} view of a ``.safetensors`` file; each tensor is read on access.

    ``safetensors.safe_open`` validates the file when it is opened; the tensors themselves are read with
    plain positioned reads rather than through a memory map, so that pages already converted do not stay
    resident (converting then needs the model's size plus one tensor, not twice the file).
    """

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        with safe_open(str(self.path), framework="np") as f:  # raises on a malformed header or size
            keys = tuple(f.keys())
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        self._data_start = 8 + header_len
        self._entries = {k: header[k] for k in keys}
        unknown = sorted({e["dtype"] for e in self._entries.values()} - set(_SAFETENSORS_DTYPES))
        if unknown:
            raise ConversionError(f"{self.path}: unsupported tensor dtype(s) {unknown}")

    def __getitem__(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        dtype = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        count = (end - begin) // dtype.itemsize
        array = np.fromfile(self.path, dtype=dtype, count=count, offset=self._data_start + begin)
        if array.size != count:
            raise ConversionError(f"{self.path}: tensor {key!r} is truncated")
        return array.reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _load_torch_bin(path: Path) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"reading {path.name} (a torch checkpoint) needs torch: pip install 'fseg_jax[convert]', "
            "or convert a model.safetensors file, which needs no torch"
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict {{name: tensor}}")
    return state


def open_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """The {name: tensor} mapping of a ``.safetensors`` or torch ``.bin``/``.pt``/``.pth`` checkpoint (flat, but
    for training checkpoints that nest the state dict, e.g. DINOv2's ``{"teacher": {...}}``, which their layout's
    rules unpack).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: the file is not a readable checkpoint (truncated, corrupt, wrong format).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path)
        if path.suffix in (".bin", ".pt", ".pth"):
            return _load_torch_bin(path)
    except (ConversionError, ImportError):
        raise
    except Exception as err:  # the readers raise many types for damaged files; report them all the same way
        raise ConversionError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    raise ConversionError(f"unknown checkpoint format {path.suffix!r} ({path}); expected .safetensors or .bin")


LAYOUTS = ("timm", "transformers", "dinov2_teacher")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference


def convert_checkpoint(path: str | Path, config, *, layout: str = "timm", **model_kwargs):
    """A checkpoint file to the NNX model: ``convert_timm_state_dict`` (``layout="timm"``),
    ``convert_hf_state_dict`` (``layout="transformers"``) or ``convert_dinov2_teacher_state_dict``
    (``layout="dinov2_teacher"``, a DINOv2 training checkpoint) of ``open_checkpoint(path)``."""
    from fseg_jax.convert.hf import convert_hf_state_dict
    from fseg_jax.convert.timm import convert_dinov2_teacher_state_dict, convert_timm_state_dict

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    convert = {"timm": convert_timm_state_dict, "transformers": convert_hf_state_dict,
               "dinov2_teacher": convert_dinov2_teacher_state_dict}[layout]
    state = open_checkpoint(path)
    try:
        return convert(state, config, **model_kwargs)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err.summary}", err.problems) from err


def hub_config_layout(hub_config: Mapping[str, Any]) -> str | None:
    """``"timm"`` for a timm ``config.json`` (``architecture``), ``"transformers"`` for a transformers one
    (``model_type`` / ``architectures``), None for anything else (e.g. a converted fseg_jax directory)."""
    if "format" in hub_config:
        return None
    if "architecture" in hub_config:
        return "timm"
    if "model_type" in hub_config or "architectures" in hub_config:
        return "transformers"
    return None


def hub_folder_layout(directory: str | Path) -> str | None:
    """:func:`hub_config_layout` of a folder's ``config.json``; None where it is missing or unreadable."""
    try:
        hub_config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return hub_config_layout(hub_config) if isinstance(hub_config, dict) else None


def convert_hub_folder(directory: str | Path, **model_kwargs):
    """Convert a folder as the hub ships a model (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``), with the converter its ``config.json`` names (:func:`hub_config_layout`).

    The config is read with ``ViTConfig.from_timm`` or ``ViTConfig.from_hf`` (named after the folder); options
    the port does not implement are refused by name.
    """
    from fseg_jax.models.config import ViTConfig

    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        hub_config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{directory} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"cannot read {config_path}: {err}") from err
    layout = hub_config_layout(hub_config) if isinstance(hub_config, dict) else None
    if layout is None:
        raise ConversionError(f"{config_path} is neither a timm nor a transformers model config")
    try:
        if layout == "timm":
            config = ViTConfig.from_timm(hub_config, name=directory.name)
        else:
            config = ViTConfig.from_hf(hub_config, name=directory.name)
    except ValueError as err:
        raise ConversionError(f"{config_path}: {err}") from err
    weights = next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise ConversionError(f"{directory} has none of {', '.join(WEIGHT_FILES)}")
    return convert_checkpoint(weights, config, layout=layout, **model_kwargs)
