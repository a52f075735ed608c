"""The options of a segmentation run: their names, defaults, choices and checks, in one JAX-free module.

``fseg_jax.segmentation.Pipeline`` owns a run's description and applies these checks once, before any work;
the command line builds its options' choices and defaults from the same constants, so that ``fseg-jax --help``
needs no JAX and no front end can offer an option, a default or a choice another lacks. Each check raises
``ValueError`` with one sentence naming the option, the value given and what is accepted.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

METHODS = ("project", "nearest", "factorize", "dff")
"""F-Seg's segmentation methods (what each does: ``fseg_jax.segmentation``)."""

SOLVERS = ("admm", "hals", "mu")
"""NNLS solvers of ``fseg_jax.factorization`` (method ``"project"``)."""

NMF_SOLVERS = ("hals", "mu")
"""Full-NMF solvers of ``fseg_jax.factorization`` (methods ``"factorize"`` and ``"dff"``)."""

DTYPES = ("float32", "bfloat16")
"""Compute dtypes of the forward pass; ``"float32"`` is the model's own."""

RESOLUTIONS = ("pixel", "token")
"""Slide label resolutions: F-Seg's per-pixel rule, or one label per token."""

RUN_DEFAULTS: dict[str, Any] = {
    "k": None,
    "method": "project",
    "layer": -1,
    "n_components": 20,
    "seed": 0,
    "solver": None,
    "tol": None,
    "max_iter": None,
    "dtype": None,
    "bucket": None,
    "batch": 16,
    "random_init": None,
    "depth": None,
}
"""The keywords of ``Pipeline.create`` besides the bank and the model, with their defaults: every front end
(``segment``, ``make_token_fn``, ``segment_slide``, ``SlideSegmenter.from_model``, ``concept_atlas`` and the
command line) takes exactly these."""

SLIDE_DEFAULTS: dict[str, Any] = {
    "mpp": 0.5,
    "slide_mpp": None,
    "tile": None,
    "margin": None,
    "resolution": "pixel",
}
"""The slide options shared by ``segment_slide``, ``SlideSegmenter`` and ``fseg-jax slide``."""

DEFAULT_TILE = 1024
"""Working pixels a slide tile side when none is given, rounded down to a multiple of the model's patch."""

BUILD_KS = (8, 16, 32, 64, 128, 256)
"""The k of a bank ``build_concepts`` makes when none are given."""

LEARN_KS = (8, 16, 32)
"""The k of a bank ``learn_concepts`` learns when none are given."""

SLIDE_MPP_TOLERANCE = 2.0
"""A given slide mpp that differs from the file's own by more than this factor is refused unless forced."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; bools, strings and floats (4.0 included) are refused."""
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_optional_int(name: str, value, *, minimum: int = 1) -> int | None:
    return None if value is None else check_int(name, value, minimum=minimum)


def check_positive(name: str, value) -> float:
    """``value`` as a finite float > 0 (microns per pixel); bools and strings are refused."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_layers(layer) -> tuple[int, ...]:
    """``layer`` (an int or a non-empty sequence of ints, negative from the end) as a tuple of ints."""
    iterable = hasattr(layer, "__iter__") and not isinstance(layer, (str, bytes))
    layers = list(layer) if iterable else [layer]
    if not layers or not all(_is_int(i) for i in layers):
        raise ValueError(f"layer must be an int or a non-empty list of ints, got {layer!r}")
    return tuple(int(i) for i in layers)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_alpha(alpha) -> float:
    """The overlay's opacity, a number in [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= float(alpha) <= 1:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    return float(alpha)


def check_devices(devices) -> list | None:
    """None (every local device) or a non-empty list of devices."""
    if devices is None:
        return None
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device, got an empty list; leave it unset for all")
    return devices


def check_tol(tol) -> float | None:
    if tol is not None and (
        isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol >= 0)
    ):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return None if tol is None else float(tol)


def check_components(method: str, m: int, n_tokens: int, d: int, where: str) -> None:
    """An NMF of a (d, n) matrix into m components needs m <= min(n, d) (``fseg_jax.factorize``'s rule)."""
    if method in ("factorize", "dff") and m > min(n_tokens, d):
        what = "k" if method == "dff" else "n_components"
        raise ValueError(
            f"{what}={m} NMF components exceed min(tokens, feature dimension) = min({n_tokens}, {d}) for {where}; "
            f"use {what} <= {min(n_tokens, d)}"
        )


def check_slide_mpp(given: float | None, recorded: float | None, *, force: bool = False) -> None:
    """A slide mpp given by hand must agree with the file's own within ``SLIDE_MPP_TOLERANCE`` unless forced."""
    if given is None or recorded is None or force:
        return
    ratio = max(given, recorded) / min(given, recorded)
    if ratio > SLIDE_MPP_TOLERANCE:
        raise ValueError(
            f"slide_mpp {given:g} contradicts the {recorded:g} um/px the file records ({ratio:.1f}x apart); leave "
            "it unset to use the file's, or force it (force_slide_mpp=True, --force-slide-mpp) if the file is wrong"
        )
