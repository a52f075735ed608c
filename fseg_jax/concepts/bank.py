"""The concept bank type and its file format.

A :class:`ConceptBank` holds the (k, d) centres F-Seg projects features onto, one matrix per k. On disk a
bank is a safetensors file with one float32 tensor per k, named ``k8``, ``k16``, ... and string metadata::

    format = "fseg_jax.concepts", format_version = "1", feature_dim = "1024", ks = "8,16,32,64,128,256",
    model = "uni" or "/abs/path/to/converted/model" (optional), layer = "-1" or "[-4, -1]" (optional, JSON),
    names.16 = '{"3": "tumour", "5": "stroma"}', colors.16 = '{"3": "#d62728"}' (optional, JSON, per k)

Banks written before names existed load unchanged, and readers that do not know the names keys ignore them.

Safetensors holds raw arrays and a JSON header only, so loading a bank never runs code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fseg_jax._files import atomic_path
from fseg_jax.concepts.names import ConceptClasses, validated_names

FORMAT = "fseg_jax.concepts"
FORMAT_VERSION = "1"
_TENSOR_NAME = re.compile(r"k([1-9][0-9]*)")
_NAMES_KEY = re.compile(r"(names|colors)\.([1-9][0-9]*)")


@dataclass(frozen=True, eq=False)
class ConceptBank:
    """Concept centres for several k, all of one feature dimension.

    Attributes:
        concepts: {k: (k, d) float32 array}; stored as read-only copies, sorted by k.
        model: the model whose features the centres live in: a preset name or the absolute directory of a
            converted model (what ``fseg_jax.segment`` loads when it is given no model), another label, or None.
        layer: the block index the features come from (a tuple when several blocks are concatenated), or None.
        names: {k: {concept index: name}} for the concepts that have a name; concepts of one k that share a
            name form one class (see :meth:`classes`).
        colors: {k: {concept index: "#rrggbb"}} for the concepts given a colour ((r, g, b) ints are accepted
            and stored as #rrggbb); the concepts of one class may not be given different colours.

    ``bank[k]`` is the (k, d) matrix (ValueError listing the available k otherwise), ``bank.ks`` the sorted
    k values, ``bank.feature_dim`` d. :meth:`with_names` gives a copy with names and colours set.
    """

    concepts: Mapping[int, np.ndarray]
    model: str | None = None
    layer: int | tuple[int, ...] | None = None
    names: Mapping[int, Mapping[int, str]] | None = None
    colors: Mapping[int, Mapping[int, str]] | None = None

    def __post_init__(self):
        object.__setattr__(self, "concepts", validated_concepts(self.concepts, source="concepts"))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty string or None, got {self.model!r}")
        object.__setattr__(self, "layer", normalise_layer(self.layer))
        names, colors = validated_names(self.names, self.colors, self.ks)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "colors", colors)

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.concepts)

    @property
    def feature_dim(self) -> int:
        return int(next(iter(self.concepts.values())).shape[1])

    def __getitem__(self, k: int) -> np.ndarray:
        try:
            return self.concepts[int(k)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"k={k!r} is not in this concept bank; available: {', '.join(map(str, self.ks))}"
            ) from None

    def __contains__(self, k: object) -> bool:
        return isinstance(k, (int, np.integer)) and int(k) in self.concepts

    def has_names(self, k: int) -> bool:
        """Whether the bank names or colours any concept of this k (ValueError for a k it lacks)."""
        self[k]
        return int(k) in self.names or int(k) in self.colors

    def classes(self, k: int) -> ConceptClasses:
        """The classes of this k: its concepts grouped by name (:class:`~fseg_jax.concepts.names.ConceptClasses`).
        ValueError for a k the bank lacks, and for a k whose concepts the bank neither names nor colours."""
        if not self.has_names(k):
            raise ValueError(
                f"the concept bank has no names for k={int(k)}: name its concepts first "
                f"(fseg-jax concepts name BANK --k {int(k)} 3=tumour ..., or ConceptBank.with_names)"
            )
        return ConceptClasses.from_names(int(k), self.names.get(int(k), {}), self.colors.get(int(k), {}))

    def with_names(
        self,
        k: int,
        names: Mapping[int, str] | None = None,
        colors: Mapping[int, Any] | None = None,
        *,
        clear: bool = False,
    ) -> ConceptBank:
        """A new bank whose concepts of this k carry ``names`` ({concept: name}) and ``colors``
        ({concept: "#rrggbb" or (r, g, b)}) on top of the ones this bank gives them (``clear``: instead of
        them). This bank is unchanged. ValueError naming the problem for a k the bank lacks, a concept
        outside 0..k-1, an empty name, a malformed colour or two colours for one class."""
        self[k]
        k = int(k)
        keep = not clear
        new_names = {**self.names, k: {**(self.names.get(k, {}) if keep else {}), **dict(names or {})}}
        new_colors = {**self.colors, k: {**(self.colors.get(k, {}) if keep else {}), **dict(colors or {})}}
        return ConceptBank(self.concepts, model=self.model, layer=self.layer, names=new_names, colors=new_colors)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptBank):
            return NotImplemented
        return (
            (self.model, self.layer, self.ks, self.names, self.colors)
            == (other.model, other.layer, other.ks, other.names, other.colors)
            and all(np.array_equal(self.concepts[k], other.concepts[k]) for k in self.ks)
        )

    __hash__ = None

    def __repr__(self) -> str:
        named = sorted(set(self.names) | set(self.colors))
        return (
            f"ConceptBank(model={self.model!r}, layer={self.layer!r}, ks={self.ks}, feature_dim={self.feature_dim}"
            + (f", named ks={tuple(named)})" if named else ")")
        )


def normalise_layer(layer: Any) -> int | tuple[int, ...] | None:
    """A layer as banks record it: an int, a tuple of several ints (one int for a list of one), or None."""
    if layer is None:
        return None
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return int(layer)
    if isinstance(layer, (list, tuple)) and layer and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layer
    ):
        return int(layer[0]) if len(layer) == 1 else tuple(int(i) for i in layer)
    raise ValueError(f"layer must be an int, a non-empty list of ints or None, got {layer!r}")


def validated_concepts(concepts: Any, *, source: str) -> dict[int, np.ndarray]:
    """{k: (k, d)} as sorted read-only float32 copies; one ValueError listing every problem otherwise."""
    if not isinstance(concepts, Mapping):
        raise ValueError(f"{source}: expected a dict {{k: (k, d) array}}, got {type(concepts).__name__}")
    if not concepts:
        raise ValueError(f"{source}: empty concept bank (no k)")
    problems, out = [], {}
    for key, value in concepts.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or int(key) < 1:
            problems.append(f"key {key!r} is not a positive integer k")
            continue
        k = int(key)
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError):  # ragged nested sequences
            problems.append(f"k={k}: expected an array, got {type(value).__name__}")
            continue
        if arr.ndim != 2 or arr.shape[0] != k or arr.shape[1] < 1:
            problems.append(f"k={k}: expected shape ({k}, d), got {arr.shape}")
        elif arr.dtype.kind not in "fiu":
            problems.append(f"k={k}: expected real numbers, got dtype {arr.dtype}")
        elif not np.isfinite(arr).all():
            problems.append(f"k={k}: contains NaN or infinite values")
        else:
            out[k] = arr
    dims = sorted({a.shape[1] for a in out.values()})
    if len(dims) > 1:
        problems.append("feature dimensions differ between k: " + ", ".join(f"k={k}: {a.shape[1]}" for k, a in out.items()))
    if problems:
        raise ValueError(f"{source}: invalid concept bank: " + "; ".join(problems))
    frozen = {}
    for k in sorted(out):
        arr = np.array(out[k], dtype=np.float32, copy=True)
        arr.setflags(write=False)
        frozen[k] = arr
    return frozen


def layer_count(layer: int | tuple[int, ...] | None) -> int:
    """How many blocks' features are concatenated for a normalised `layer` (1 for an int or None)."""
    return len(layer) if isinstance(layer, tuple) else 1


def check_compatible(
    bank: ConceptBank,
    feature_dim: int,
    *,
    model_name: str | None = None,
    layer: int | Sequence[int] | None = None,
    model_source: str | None = None,
) -> None:
    """Raise ValueError when `bank` cannot be used with features of width `feature_dim`.

    The message names both the bank's model and `model_name` (the model's config name). A bank made for a
    different model of the same width (UNI and ResNet-50 are both 1024) or a different layer gets a
    UserWarning: the shapes fit but the centres describe other features. The bank matches when it records
    `model_name` or `model_source` (the preset or directory the model was loaded from).
    """
    if bank.feature_dim != int(feature_dim):
        raise ValueError(
            f"concept bank for model {bank.model or '(unknown)'} has feature dimension {bank.feature_dim}, "
            f"but model {model_name or '(unnamed)'} gives {int(feature_dim)}-dimensional features; "
            "use a bank made for this model (fseg-jax concepts build)"
        )
    if model_name is not None and bank.model is not None and bank.model not in (model_name, model_source):
        warnings.warn(
            f"concept bank was made for model {bank.model!r} but is used with {model_source or model_name!r}",
            UserWarning,
            stacklevel=2,
        )
    if layer is not None and bank.layer is not None and normalise_layer(layer) != bank.layer:
        warnings.warn(
            f"concept bank was made from layer {bank.layer} but is used with layer {normalise_layer(layer)}",
            UserWarning,
            stacklevel=2,
        )


def save_concepts(path: str | os.PathLike, bank: ConceptBank) -> Path:
    """Write `bank` as safetensors (see the module docs), atomically: a temporary file in the same folder is
    renamed over `path`, so readers never see a half-written bank. Missing parent folders are created.
    Returns the path."""
    from safetensors.numpy import save

    if not isinstance(bank, ConceptBank):
        raise TypeError(f"save_concepts expects a ConceptBank, got {type(bank).__name__}")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "feature_dim": str(bank.feature_dim),
        "ks": ",".join(map(str, bank.ks)),
    }
    if bank.model is not None:
        metadata["model"] = bank.model
    if bank.layer is not None:
        metadata["layer"] = json.dumps(list(bank.layer) if isinstance(bank.layer, tuple) else bank.layer)
    for key, per_k in (("names", bank.names), ("colors", bank.colors)):
        for k, entries in per_k.items():
            metadata[f"{key}.{k}"] = json.dumps({str(c): v for c, v in entries.items()})
    data = save({f"k{k}": np.ascontiguousarray(c) for k, c in bank.concepts.items()}, metadata=metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def load_concepts(path: str | os.PathLike) -> ConceptBank:
    """Read a bank written by :func:`save_concepts`. FileNotFoundError when absent; ValueError naming the file
    for anything that is not a valid bank (corrupt or truncated file, a pickle, wrong format, bad tensors)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept bank not found: {path}")
    with open(path, "rb") as f:
        head = f.read(9)
    # a pickle starts with its PROTO opcode 0x80; a safetensors file with its header's length (8 bytes, little
    # endian, which may start with 0x80 too) and then the header's "{"
    if path.suffix.lower() in (".joblib", ".pkl", ".pickle") or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise ValueError(
            f"{path} looks like a pickle (joblib) file, not a safetensors concept bank; convert it once with "
            "`fseg-jax concepts import FILE --trust-pickle -o BANK.safetensors` (unpickling runs code: only for "
            "files you trust)"
        )
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors concept bank ({e})") from None
    return _bank_from_file(path, metadata, tensors)


def _bank_from_file(path: Path, metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> ConceptBank:
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a concept bank (metadata format is "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: concept bank format version {metadata.get('format_version')!r} is not supported "
                         f"(this fseg_jax reads version {FORMAT_VERSION})")
    concepts, problems = {}, []
    for name, arr in tensors.items():
        m = _TENSOR_NAME.fullmatch(name)
        if m is None:
            problems.append(f"unexpected tensor {name!r}")
        elif arr.dtype != np.float32:
            problems.append(f"tensor {name!r} has dtype {arr.dtype}, expected float32")
        else:
            concepts[int(m.group(1))] = arr
    try:
        dim = int(metadata["feature_dim"])
        ks = tuple(int(k) for k in metadata["ks"].split(","))
        layer = json.loads(metadata["layer"]) if "layer" in metadata else None
        labels: dict[str, dict[int, dict[int, str]]] = {"names": {}, "colors": {}}
        for key, value in metadata.items():
            if m := _NAMES_KEY.fullmatch(key):
                entries = json.loads(value)
                if not isinstance(entries, dict):
                    raise ValueError(f"{key} is not a JSON object")
                labels[m.group(1)][int(m.group(2))] = {int(c): v for c, v in entries.items()}
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: corrupt concept bank metadata ({e!r})") from None
    if ks != tuple(sorted(concepts)):
        problems.append(f"metadata lists k = {ks} but the file holds k = {tuple(sorted(concepts))}")
    if problems:
        raise ValueError(f"{path}: corrupt concept bank: " + "; ".join(problems))
    try:
        bank = ConceptBank(concepts, model=metadata.get("model"), layer=layer, **labels)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if bank.feature_dim != dim:
        raise ValueError(f"{path}: corrupt concept bank: metadata says feature_dim {dim}, tensors have {bank.feature_dim}")
    return bank
