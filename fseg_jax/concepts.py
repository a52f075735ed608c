"""Concept banks: the (k, d) centres F-Seg projects features onto, one matrix per k, in a safe file format.

On disk a bank is a safetensors file with one float32 tensor per k, named ``k8``, ``k16``, ... and string
metadata::

    format = "fseg_jax.concepts", format_version = "1", feature_dim = "1024", ks = "8,16,32,64,128,256",
    model = "uni" or "/abs/path/to/converted/model" (optional), layer = "-1" or "[-4, -1]" (optional, JSON)

Safetensors holds raw arrays and a JSON header only, so loading a bank never runs code. The upstream F-Seg
banks are joblib pickles; :func:`import_joblib_concepts` converts them once, behind an explicit opt-in
(unpickling runs whatever code the file contains). :func:`resolve_concepts` fetches the upstream bank of a
preset (UNI, Prov-GigaPath, ResNet-50) from the deepathology/fseg repository, checks it against a pinned
sha256 and caches the converted bank; the pinned hash is what makes unpickling that download acceptable:
only the exact bytes that were published (and inspected) are ever unpickled.
:func:`build_concepts` makes a bank for any model by k-means over tile features.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fseg_jax._files import atomic_path

FORMAT = "fseg_jax.concepts"
FORMAT_VERSION = "1"
DEFAULT_KS = (8, 16, 32, 64, 128, 256)

# Upstream banks published in the F-Seg repository: preset -> (file name, sha256 of that file).
UPSTREAM_URL = "https://raw.githubusercontent.com/deepathology/fseg/main/model_embeddings/"
UPSTREAM_BANKS = {
    "uni": ("uni.joblib", "6b87f0082187cb48c060eb5f390fb73b70de15c6bc2467b6d1a870298a2fd7fd"),
    "gigapath": ("prov_gigapath.joblib", "82f3cf7cafd607c182cea1b1eab50f5fc6fabef6f47f9849ad1a960c2ad12c3d"),
    "resnet50": ("resnet.joblib", "d8fe4411715ff53460594c5d574f88ac850c09e0d658423905c2dd0274a95f9c"),
}
_ALIASES = {"prov_gigapath": "gigapath", "resnet": "resnet50"}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_TENSOR_NAME = re.compile(r"k([1-9][0-9]*)")


@dataclass(frozen=True, eq=False)
class ConceptBank:
    """Concept centres for several k, all of one feature dimension.

    Attributes:
        concepts: {k: (k, d) float32 array}; stored as read-only copies, sorted by k.
        model: the model whose features the centres live in: a preset name or the absolute directory of a
            converted model (what ``fseg_jax.segment`` loads when it is given no model), another label, or None.
        layer: the block index the features come from (a tuple when several blocks are concatenated), or None.

    ``bank[k]`` is the (k, d) matrix (ValueError listing the available k otherwise), ``bank.ks`` the sorted
    k values, ``bank.feature_dim`` d.
    """

    concepts: Mapping[int, np.ndarray]
    model: str | None = None
    layer: int | tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "concepts", _validated_concepts(self.concepts, source="concepts"))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty string or None, got {self.model!r}")
        object.__setattr__(self, "layer", _normalise_layer(self.layer))

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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConceptBank):
            return NotImplemented
        return (
            (self.model, self.layer, self.ks) == (other.model, other.layer, other.ks)
            and all(np.array_equal(self.concepts[k], other.concepts[k]) for k in self.ks)
        )

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"ConceptBank(model={self.model!r}, layer={self.layer!r}, ks={self.ks}, feature_dim={self.feature_dim})"
        )


def _normalise_layer(layer: Any) -> int | tuple[int, ...] | None:
    if layer is None:
        return None
    if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
        return int(layer)
    if isinstance(layer, (list, tuple)) and layer and all(
        isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in layer
    ):
        return int(layer[0]) if len(layer) == 1 else tuple(int(i) for i in layer)
    raise ValueError(f"layer must be an int, a non-empty list of ints or None, got {layer!r}")


def _validated_concepts(concepts: Any, *, source: str) -> dict[int, np.ndarray]:
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


def _layer_count(layer: int | tuple[int, ...] | None) -> int:
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
    if layer is not None and bank.layer is not None and _normalise_layer(layer) != bank.layer:
        warnings.warn(
            f"concept bank was made from layer {bank.layer} but is used with layer {_normalise_layer(layer)}",
            UserWarning,
            stacklevel=2,
        )


# ---------------------------------------------------------------------------------------------------- files


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
        head = f.read(2)
    if path.suffix.lower() in (".joblib", ".pkl", ".pickle") or head[:1] == b"\x80":
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
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: corrupt concept bank metadata ({e!r})") from None
    if ks != tuple(sorted(concepts)):
        problems.append(f"metadata lists k = {ks} but the file holds k = {tuple(sorted(concepts))}")
    if problems:
        raise ValueError(f"{path}: corrupt concept bank: " + "; ".join(problems))
    try:
        bank = ConceptBank(concepts, model=metadata.get("model"), layer=layer)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if bank.feature_dim != dim:
        raise ValueError(f"{path}: corrupt concept bank: metadata says feature_dim {dim}, tensors have {bank.feature_dim}")
    return bank


def import_joblib_concepts(
    path: str | os.PathLike,
    *,
    trust_pickle: bool = False,
    model: str | None = None,
    layer: int | Sequence[int] | None = -1,
) -> ConceptBank:
    """Convert an upstream F-Seg bank (a joblib pickle of {k: (k, d) float32}) into a :class:`ConceptBank`.

    Unpickling executes code stored in the file, so this refuses unless `trust_pickle=True`: pass it only for
    files from a source you trust (the deepathology/fseg repository), then save the result with
    :func:`save_concepts` and use that safe file from then on. `model` names the model the bank belongs to
    (checked against that preset's feature width when fseg_jax knows the preset); `layer` is the block the
    features came from (upstream banks: the last, -1). Needs joblib.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file not found: {path}")
    if not trust_pickle:
        raise ValueError(
            f"refusing to unpickle {path}: loading a joblib/pickle file runs code stored in it. Pass "
            "trust_pickle=True (CLI: --trust-pickle) only for a file from a source you trust"
        )
    try:
        import joblib
    except ImportError:
        raise ImportError("reading joblib concept banks needs joblib: pip install joblib") from None
    try:
        content = joblib.load(path)
    except Exception as e:  # any failure to unpickle is reported as a bad file, whatever its type
        raise ValueError(f"cannot read {path} as a joblib concept bank ({type(e).__name__}: {e})") from None
    bank = ConceptBank(_validated_concepts(content, source=str(path)), model=model, layer=layer)
    expected = None if model is None else _preset_feature_dim(model)
    if expected is not None and bank.feature_dim != expected * _layer_count(bank.layer):
        raise ValueError(
            f"{path} holds {bank.feature_dim}-dimensional concepts, but model {model} has "
            f"{expected * _layer_count(bank.layer)}-dimensional features: wrong preset for this file?"
        )
    return bank


def _preset_feature_dim(name: str) -> int | None:
    """Feature width of a model preset fseg_jax knows, None for any other name."""
    from fseg_jax.models.config import config_from_preset

    try:
        return int(config_from_preset(name).embed_dim)
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- upstream presets


def cache_dir() -> Path:
    """Where fetched banks are cached: ``$FSEG_JAX_CACHE/concepts``, default ``~/.cache/fseg_jax/concepts``."""
    root = os.environ.get("FSEG_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fseg_jax")
    return Path(root) / "concepts"


def resolve_concepts(spec: Any, *, model_config: Any = None) -> ConceptBank:
    """A :class:`ConceptBank` from a bank, a path to a ``.safetensors`` bank or an upstream preset name.

    Presets: ``"uni"``, ``"gigapath"`` (alias ``"prov_gigapath"``), ``"resnet50"`` (alias ``"resnet"``). The first
    use downloads the upstream joblib file from the deepathology/fseg repository (base URL overridable with
    ``$FSEG_JAX_CONCEPTS_URL``, e.g. a ``file://`` folder of the same files), checks its pinned sha256,
    unpickles it (acceptable because only those exact published bytes are unpickled), and caches the
    converted safetensors bank in :func:`cache_dir`; later uses read the cache. An existing file path wins over
    a preset name. With `model_config` (a model's ``.config``), the bank is checked with :func:`check_compatible`.
    """
    if isinstance(spec, ConceptBank):
        bank = spec
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        preset = _ALIASES.get(text, text)
        if Path(text).expanduser().is_file():
            bank = load_concepts(Path(text).expanduser())
        elif preset in UPSTREAM_BANKS:
            bank = _fetch_preset(preset)
        else:
            raise ValueError(
                f"concept bank {text!r}: no such file, and not a preset ({', '.join(UPSTREAM_BANKS)})"
            )
    else:
        raise TypeError(f"concepts: expected a ConceptBank, a path or a preset name, got {type(spec).__name__}")
    if model_config is not None:
        check_compatible(
            bank,
            int(model_config.embed_dim) * _layer_count(bank.layer),
            model_name=getattr(model_config, "name", None),
        )
    return bank


def _fetch_preset(preset: str) -> ConceptBank:
    file_name, sha256 = UPSTREAM_BANKS[preset]
    folder = cache_dir()
    cached = folder / f"{preset}-{sha256[:12]}.safetensors"
    if cached.is_file():
        try:
            return load_concepts(cached)
        except ValueError:
            pass  # a damaged cache entry is fetched again and overwritten
    folder.mkdir(parents=True, exist_ok=True)
    url = (os.environ.get("FSEG_JAX_CONCEPTS_URL") or UPSTREAM_URL).rstrip("/") + "/" + file_name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{file_name}.", suffix=".tmp")
    os.close(fd)
    try:
        digest = _download(url, Path(tmp))
        if digest != sha256:
            raise ValueError(
                f"{url} does not match the pinned sha256 of the {preset} concept bank (got {digest}, expected "
                f"{sha256}); not unpickling it"
            )
        bank = import_joblib_concepts(tmp, trust_pickle=True, model=preset, layer=-1)
    finally:
        Path(tmp).unlink(missing_ok=True)
    save_concepts(cached, bank)
    return bank


def _download(url: str, dest: Path) -> str:
    """Stream `url` into `dest`; return the sha256 hex digest of what was written."""
    import urllib.error
    import urllib.request

    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            while chunk := response.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise OSError(
            f"could not download {url} ({e}); fetch the file by hand and convert it with "
            "`fseg-jax concepts import FILE --trust-pickle -o BANK.safetensors`"
        ) from None
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- building


def build_concepts(
    model: Any,
    images_or_folder: Any,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    layer: int | Sequence[int] = -1,
    tile: int = 224,
    per_token: bool = False,
    tokens_per_tile: int | None = None,
    tile_filter: Callable[[np.ndarray], bool] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    n_init: int = 3,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> ConceptBank:
    """Build a bank for `model` as F-Seg prescribes: k-means over tile features, one centre matrix per k.

    Args:
        model: a model with ``.config`` and ``forward_intermediates`` (``VisionTransformer``, ``ResNet50``), a
            preset name or a converted model directory (loaded through ``fseg_jax.hub.resolve_model``).
        images_or_folder: a folder (its image files, sorted by name, not recursive), an image path, an
            ``(H, W, 3)`` image, a ``(B, H, W, 3)`` batch, or a list of any of these. Images are read one at a
            time, so memory holds one image and the per-tile features.
        ks: the k values of the bank.
        layer: block index (negative from the end), or a list of blocks whose features are concatenated.
        tile: side of the square tiles cut from each image on a non-overlapping grid (a multiple of the
            model's patch size); the border that does not fill a whole tile is left out.
        per_token: cluster every patch token instead of one spatial mean per tile.
        tokens_per_tile: with `per_token`, keep only this many randomly chosen tokens of each tile.
        tile_filter: keep a tile only when ``tile_filter(tile_hw3_uint8)`` is true (e.g. a tissue test).
        batch_size: tiles per model call.
        seed, n_init, max_iter, tol: k-means settings (see :func:`fseg_jax.kmeans.kmeans`); one seed gives
            one bank.

    Returns:
        ConceptBank with `layer` and ``model``: the preset name or absolute directory the model was loaded from
        (so that ``fseg_jax.segment(images, bank)`` finds it again), else ``model.config.name``. ValueError when
        fewer samples than the largest k are found, or for a bad tile size.
    """
    from fseg_jax.hub import model_source, resolve_model
    from fseg_jax.kmeans import kmeans

    model = resolve_model(model)

    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    config = model.config
    patch = int(config.patch_size)
    if tile < patch or tile % patch:
        raise ValueError(f"tile must be a positive multiple of the model's patch size {patch}, got {tile}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens_per_tile is not None and (not per_token or tokens_per_tile < 1):
        raise ValueError("tokens_per_tile needs per_token=True and a value >= 1")
    layer = _normalise_layer(layer)

    keep = None
    if per_token and tokens_per_tile is not None:
        rng = np.random.default_rng(seed)

        def keep(f_td: np.ndarray) -> np.ndarray:
            return f_td[np.sort(rng.choice(len(f_td), size=min(tokens_per_tile, len(f_td)), replace=False))]

    tiles = _iter_tiles(images_or_folder, tile, tile_filter)
    feats = _tile_features(model, tiles, layer, tile, batch_size, per_token, keep)
    x_nd = np.concatenate(feats, axis=0) if feats else np.zeros((0, 0), np.float32)
    if x_nd.shape[0] < ks[-1]:
        what = "tokens" if per_token else "tiles"
        raise ValueError(
            f"found {x_nd.shape[0]} {what} of {tile}x{tile} px, fewer than the largest k ({ks[-1]}); "
            "give more or larger images, a smaller tile, or smaller k"
        )
    centres = {
        k: kmeans(x_nd, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol).centers for k in ks
    }
    return ConceptBank(centres, model=model_source(model) or getattr(config, "name", None), layer=layer)


def _iter_images(images_or_folder: Any) -> Iterator[tuple[str, Any]]:
    """(name, image-like) pairs; files are yielded as paths and read by the consumer, one at a time."""
    if isinstance(images_or_folder, (str, os.PathLike)):
        path = Path(images_or_folder)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
            if not files:
                raise ValueError(f"no image files ({', '.join(_IMAGE_SUFFIXES)}) in folder {path}")
            for p in files:
                yield str(p), p
            return
        yield str(path), path
        return
    if isinstance(images_or_folder, (list, tuple)):
        if not images_or_folder:
            raise ValueError("images: empty list")
        for i, item in enumerate(images_or_folder):
            if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
                yield from _iter_images(item)
            else:
                yield f"images[{i}]", item
        return
    if hasattr(images_or_folder, "shape") and np.ndim(images_or_folder) == 4:
        for i in range(images_or_folder.shape[0]):
            yield f"images[{i}]", images_or_folder[i]
        return
    yield "image", images_or_folder


def _iter_tiles(images_or_folder: Any, tile: int, tile_filter: Callable | None) -> Iterator[np.ndarray]:
    from fseg_jax.io.images import as_rgb, to_uint8

    for name, item in _iter_images(images_or_folder):
        image = to_uint8(as_rgb(item, name=name))
        h, w = image.shape[:2]
        for y in range(0, h - tile + 1, tile):
            for x in range(0, w - tile + 1, tile):
                t = image[y : y + tile, x : x + tile]
                if tile_filter is None or tile_filter(t):
                    yield t


def _tile_features(
    model: Any,
    tiles: Iterable[np.ndarray],
    layer: Any,
    tile: int,
    batch_size: int,
    per_token: bool,
    keep: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Per tile, the spatial mean (1, D) or the tokens (h*w, D) of the ReLU'd features, in tile order.

    ``keep`` (per-token mode) selects the rows of each tile's (h*w, D) block as soon as it is computed, so
    only the kept tokens are held while the remaining tiles stream through the model."""
    import jax.numpy as jnp
    from flax import nnx

    from fseg_jax.compilation import jit
    from fseg_jax.features import preprocess, token_features

    graphdef, state = nnx.split(model)
    layers = list(layer) if isinstance(layer, tuple) else layer

    @jit
    def features(state, tiles_bhw3):
        m = nnx.merge(graphdef, state)
        f_bhwd = token_features(m, preprocess(tiles_bhw3, m.config), layers)
        if per_token:
            return f_bhwd.reshape(f_bhwd.shape[0], -1, f_bhwd.shape[-1])
        return jnp.mean(f_bhwd, axis=(1, 2))[:, None, :]

    out: list[np.ndarray] = []
    batch = np.zeros((batch_size, tile, tile, 3), np.uint8)

    def flush(n):
        f = np.asarray(features(state, batch))
        out.extend(f[i] if keep is None else keep(f[i]) for i in range(n))

    n = 0
    for t in tiles:
        batch[n] = t
        n += 1
        if n == batch_size:
            flush(n)
            n = 0
    if n:
        batch[n:] = 0
        flush(n)
    return out

