"""Concept banks: the (k, d) centres F-Seg projects features onto, one matrix per k, in a safe file format.

One concern per module: :mod:`~fseg_jax.concepts.bank` holds the :class:`ConceptBank` type and its safetensors
format, :mod:`~fseg_jax.concepts.names` the names, colours and classes a bank may give its concepts,
:mod:`~fseg_jax.concepts.upstream` the import of the upstream joblib banks and their download by
preset name, :mod:`~fseg_jax.concepts.build` the k-means that makes a bank for any model. The names below
are the public ones, importable from ``fseg_jax.concepts``.
"""

from __future__ import annotations

from fseg_jax.concepts.bank import FORMAT, FORMAT_VERSION, ConceptBank, check_compatible, load_concepts, save_concepts
from fseg_jax.concepts.build import DEFAULT_KS, build_concepts, collect_features
from fseg_jax.concepts.names import ConceptClasses
from fseg_jax.concepts.upstream import (
    UPSTREAM_BANKS,
    UPSTREAM_URL,
    default_cache_dir,
    import_joblib_concepts,
    resolve_concepts,
)

__all__ = [
    "DEFAULT_KS",
    "FORMAT",
    "FORMAT_VERSION",
    "UPSTREAM_BANKS",
    "UPSTREAM_URL",
    "ConceptBank",
    "ConceptClasses",
    "build_concepts",
    "collect_features",
    "check_compatible",
    "default_cache_dir",
    "import_joblib_concepts",
    "load_concepts",
    "resolve_concepts",
    "save_concepts",
]
