"""The public names of `fseg_jax` stay what they say, whatever was imported before."""

from __future__ import annotations

import importlib
import pkgutil
import types

import fseg_jax


def test_public_names_are_not_shadowed_by_submodules():
    # importing every submodule first must not turn `fseg_jax.segment` (the function) into a module
    for info in pkgutil.walk_packages(fseg_jax.__path__, prefix="fseg_jax."):
        importlib.import_module(info.name)
    for name in fseg_jax.__all__:
        value = getattr(fseg_jax, name)
        assert not isinstance(value, types.ModuleType), f"fseg_jax.{name} is a module, not the public {name}"
    assert callable(fseg_jax.segment) and callable(fseg_jax.overlay)
