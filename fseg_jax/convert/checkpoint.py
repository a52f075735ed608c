"""Reading the checkpoint files the Hugging Face hub ships: ``model.safetensors`` and ``pytorch_model.bin``.

Safetensors files are read lazily, one tensor per access, with numpy only (no torch): converting a
checkpoint then needs about the model's size plus one tensor. ``pytorch_model.bin`` (a torch zip) needs
torch (the ``convert`` extra) and is loaded with ``weights_only=True`` (no arbitrary pickles), memory-mapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fseg_jax.convert.timm import ConversionError


class SafetensorsCheckpoint(Mapping):
    """A read-only {name: numpy array} view of a ``.safetensors`` file; tensors are read on access."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="np")
        self._keys = tuple(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


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
    """A flat {name: tensor} mapping of a ``.safetensors`` or torch ``.bin``/``.pt``/``.pth`` checkpoint.

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


def convert_checkpoint(path: str | Path, config, **model_kwargs):
    """``convert_timm_state_dict(open_checkpoint(path), config)``: a checkpoint file to the NNX model."""
    from fseg_jax.convert.timm import convert_timm_state_dict

    state = open_checkpoint(path)
    try:
        return convert_timm_state_dict(state, config, **model_kwargs)
    except ConversionError as err:
        raise ConversionError(f"{path}: {err.summary}", err.problems) from err
