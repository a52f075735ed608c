"""The public names of `fseg_jax` stay what they say, whatever was imported before."""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

import fseg_jax


def test_public_names_are_not_shadowed_by_submodules():
    # importing every submodule first must not turn `fseg_jax.segment` (the function) into a module
    for info in pkgutil.walk_packages(fseg_jax.__path__, prefix="fseg_jax."):
        importlib.import_module(info.name)
    for name in fseg_jax.__all__:
        value = getattr(fseg_jax, name)
        assert not isinstance(value, types.ModuleType), f"fseg_jax.{name} is a module, not the public {name}"
    assert callable(fseg_jax.segment) and callable(fseg_jax.overlay)


def test_the_names_users_need_are_exported_and_are_what_they_say():
    import fseg_jax.concepts as concepts
    import fseg_jax.factorization as factorization
    import fseg_jax.segmentation as segmentation

    expected = {
        "segment": segmentation.segment,
        "Pipeline": segmentation.Pipeline,
        "SegmentResult": segmentation.SegmentResult,
        "make_token_fn": segmentation.make_token_fn,
        "ConceptBank": concepts.ConceptBank,
        "build_concepts": concepts.build_concepts,
        "project": factorization.project,
        "factorize": factorization.factorize,
        "nnls": factorization.nnls,
        "nmf": factorization.nmf,
        "nmf_from": factorization.nmf_from,
    }
    for name, value in expected.items():
        assert name in fseg_jax.__all__, name
        assert getattr(fseg_jax, name) is value, name
    assert isinstance(fseg_jax.Pipeline, type) and callable(fseg_jax.Pipeline.create)
    assert fseg_jax.SegmentResult._fields == ("labels", "weights", "components", "component_concepts")
    # every advertised name resolves, and the static type-checking imports name the same set
    for name in fseg_jax.__all__:
        getattr(fseg_jax, name)
    source = (Path(fseg_jax.__file__)).read_text()
    checked = source[source.index("if TYPE_CHECKING:"):]
    assert all(re.search(rf"\b{name}\b", checked) for name in fseg_jax.__all__)
