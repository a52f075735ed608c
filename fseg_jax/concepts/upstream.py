"""The upstream F-Seg concept banks: importing their joblib pickles, and fetching, checking and caching them.

The upstream F-Seg banks are joblib pickles; :func:`import_joblib_concepts` converts them once, behind an
explicit opt-in (unpickling runs whatever code the file contains). :func:`resolve_concepts` fetches the
upstream bank of a preset (UNI, Prov-GigaPath, ResNet-50) from the deepathology/fseg repository, checks it
against a pinned sha256 and caches the converted bank; the pinned hash is what makes unpickling that download
acceptable: only the exact bytes that were published (and inspected) are ever unpickled.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from fseg_jax.concepts.bank import (
    ConceptBank,
    check_compatible,
    layer_count,
    load_concepts,
    save_concepts,
    validated_concepts,
)

# Upstream banks published in the F-Seg repository: preset -> (file name, sha256 of that file).
UPSTREAM_URL = "https://raw.githubusercontent.com/deepathology/fseg/main/model_embeddings/"
UPSTREAM_BANKS = {
    "uni": ("uni.joblib", "6b87f0082187cb48c060eb5f390fb73b70de15c6bc2467b6d1a870298a2fd7fd"),
    "gigapath": ("prov_gigapath.joblib", "82f3cf7cafd607c182cea1b1eab50f5fc6fabef6f47f9849ad1a960c2ad12c3d"),
    "resnet50": ("resnet.joblib", "d8fe4411715ff53460594c5d574f88ac850c09e0d658423905c2dd0274a95f9c"),
}
_ALIASES = {"prov_gigapath": "gigapath", "resnet": "resnet50"}


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
    features came from (upstream banks: the last, -1). Needs joblib (the ``pickle`` extra).
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
        raise ImportError("reading joblib concept banks needs joblib: pip install 'fseg_jax[pickle]'") from None
    try:
        content = joblib.load(path)
    except Exception as e:  # any failure to unpickle is reported as a bad file, whatever its type
        raise ValueError(f"cannot read {path} as a joblib concept bank ({type(e).__name__}: {e})") from None
    bank = ConceptBank(validated_concepts(content, source=str(path)), model=model, layer=layer)
    expected = None if model is None else _preset_feature_dim(model)
    if expected is not None and bank.feature_dim != expected * layer_count(bank.layer):
        raise ValueError(
            f"{path} holds {bank.feature_dim}-dimensional concepts, but model {model} has "
            f"{expected * layer_count(bank.layer)}-dimensional features: wrong preset for this file?"
        )
    return bank


def _preset_feature_dim(name: str) -> int | None:
    """Feature width of a model preset fseg_jax knows, None for any other name."""
    from fseg_jax.models.config import config_from_preset

    try:
        return int(config_from_preset(name).embed_dim)
    except ValueError:
        return None


def default_cache_dir() -> Path:
    """Where :func:`resolve_concepts` caches banks unless told otherwise: ``~/.cache/fseg_jax/concepts``."""
    return Path.home() / ".cache" / "fseg_jax" / "concepts"


def resolve_concepts(
    spec: Any,
    *,
    model_config: Any = None,
    cache_dir: str | os.PathLike | None = None,
    base_url: str = UPSTREAM_URL,
) -> ConceptBank:
    """A :class:`ConceptBank` from a bank, a path to a ``.safetensors`` bank or an upstream preset name.

    Presets: ``"uni"``, ``"gigapath"`` (alias ``"prov_gigapath"``), ``"resnet50"`` (alias ``"resnet"``). The first
    use downloads the upstream joblib file from `base_url` (the deepathology/fseg repository; a mirror of the
    same files, ``https://`` or a ``file://`` folder, works as well), checks its pinned sha256, unpickles it
    (acceptable because only those exact published bytes are unpickled), and caches the download and the
    converted safetensors bank in `cache_dir` (default :func:`default_cache_dir`); later uses read the cache.
    Converting needs joblib (the ``pickle`` extra).
    An existing file path wins over a preset name. With `model_config` (a model's ``.config``), the bank is
    checked with :func:`check_compatible`.
    """
    if isinstance(spec, ConceptBank):
        bank = spec
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        preset = _ALIASES.get(text, text)
        if Path(text).expanduser().is_file():
            bank = load_concepts(Path(text).expanduser())
        elif preset in UPSTREAM_BANKS:
            folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            bank = _fetch_preset(preset, folder, base_url)
        else:
            raise ValueError(
                f"concept bank {text!r}: no such file, and not a preset ({', '.join(UPSTREAM_BANKS)})"
            )
    else:
        raise TypeError(f"concepts: expected a ConceptBank, a path or a preset name, got {type(spec).__name__}")
    if model_config is not None:
        check_compatible(
            bank,
            int(model_config.embed_dim) * layer_count(bank.layer),
            model_name=getattr(model_config, "name", None),
        )
    return bank


def _fetch_preset(preset: str, folder: Path, base_url: str) -> ConceptBank:
    """The converted bank of `preset` from `folder`, else downloaded (hash-checked by pooch), converted and cached."""
    file_name, sha256 = UPSTREAM_BANKS[preset]
    cached = folder / f"{preset}-{sha256[:12]}.safetensors"
    if cached.is_file():
        try:
            return load_concepts(cached)
        except ValueError:
            pass  # a damaged cache entry is converted again and overwritten
    download = _download(base_url.rstrip("/") + "/" + file_name, sha256, folder / "downloads", preset)
    bank = import_joblib_concepts(download, trust_pickle=True, model=preset, layer=-1)
    save_concepts(cached, bank)
    return bank


def _download(url: str, sha256: str, folder: Path, preset: str) -> Path:
    """`url` as a file in `folder` whose sha256 pooch has checked: a cached copy is checked before it is reused,
    a download before it is kept (a mismatching one is deleted)."""
    import pooch

    downloader = _copy_file_url if url.startswith("file:") else pooch.downloaders.choose_downloader(url)
    fname = url.rsplit("/", 1)[-1]
    try:
        return Path(pooch.retrieve(url, known_hash=f"sha256:{sha256}", fname=fname, path=folder,
                                   downloader=downloader))
    except ValueError:  # pooch's hash check
        raise ValueError(
            f"{url} does not match the pinned sha256 {sha256} of the {preset} concept bank, so it was not unpickled"
        ) from None
    except OSError as e:  # requests' errors are OSErrors too
        raise OSError(
            f"could not download {url} ({e}); fetch the file by hand and convert it with "
            "`fseg-jax concepts import FILE --trust-pickle -o BANK.safetensors`"
        ) from None


def _copy_file_url(url: str, output_file: str, pooch: Any) -> None:
    """A pooch downloader for ``file://`` URLs: a local mirror of the upstream folder."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    shutil.copyfile(url2pathname(urlparse(url).path), output_file)
