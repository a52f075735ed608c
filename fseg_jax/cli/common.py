"""What the subcommands share: model options, the compilation cache folder, one-line errors.

The command line, not the library, reads the environment: ``$FSEG_JAX_CACHE`` and ``$FSEG_JAX_CONCEPTS_URL``
are resolved here and passed on as arguments.
"""

from __future__ import annotations

import os
from pathlib import Path

import click


def default_cache_root() -> Path:
    """``$FSEG_JAX_CACHE``, default ``~/.cache/fseg_jax``: fseg_jax's own caches (compiled programs, banks)."""
    return Path(os.environ.get("FSEG_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fseg_jax"))


def default_compilation_cache() -> Path:
    """``$FSEG_JAX_CACHE/jax``, default ``~/.cache/fseg_jax/jax``."""
    return default_cache_root() / "jax"


def resolve_concepts_option(spec: str):
    """The bank ``--concepts`` names: a ``.safetensors`` file, or a preset cached in ``$FSEG_JAX_CACHE/concepts``
    (default ``~/.cache/fseg_jax/concepts``) and fetched on first use from ``$FSEG_JAX_CONCEPTS_URL`` (a mirror
    of the upstream folder, ``https://`` or ``file://``), default the upstream F-Seg repository."""
    from fseg_jax.concepts import UPSTREAM_URL, resolve_concepts

    return resolve_concepts(
        spec,
        cache_dir=default_cache_root() / "concepts",
        base_url=os.environ.get("FSEG_JAX_CONCEPTS_URL") or UPSTREAM_URL,
    )


def concepts_option(spec: str, k: int | None):
    """The bank ``--concepts`` names (:func:`resolve_concepts_option`), with one-line errors, and a usage error
    when the bank holds several k and ``--k`` does not pick one."""
    try:
        bank = resolve_concepts_option(spec)
    except (ValueError, TypeError, OSError, ImportError) as e:
        raise click.ClickException(f"cannot load concepts {spec!r}: {one_line(e)}") from None
    if k is None and len(bank.ks) > 1:
        raise click.UsageError(f"--k is required: the bank holds k in {', '.join(map(str, bank.ks))}")
    return bank


def random_model_options(command):
    """Add ``--random-init SEED`` and ``--depth N``: a random-weight model of a preset, built in memory."""
    command = click.option(
        "--depth", type=int, default=None,
        help="With --random-init: keep only this many blocks (a quicker model for trying the pipeline).",
    )(command)
    return click.option(
        "--random-init", "random_seed", type=int, default=None, metavar="SEED",
        help="Random weights of the --model preset's architecture, drawn from SEED and built in memory (nothing "
             "is downloaded or written). For trying the pipeline without the weights: its segmentations mean nothing.",
    )(command)


def model_from_options(spec: str | None, random_seed: int | None, depth: int | None):
    """The model the options name: a random model, a loaded one (cached), or None (the bank's own)."""
    from fseg_jax.convert.engine import ConversionError
    from fseg_jax.hub import ModelAccessError, random_model, resolve_model

    if depth is not None and random_seed is None:
        raise click.UsageError("--depth applies to --random-init models only")
    if spec is None:
        if random_seed is not None:
            raise click.UsageError("--random-init needs --model PRESET, the architecture to draw weights for")
        return None
    try:
        if random_seed is not None:
            return random_model(spec, seed=random_seed, depth=depth)
        return resolve_model(spec)
    except (ValueError, OSError, ConversionError, ModelAccessError) as e:
        raise click.ClickException(f"cannot load model {spec}: {one_line(e)}") from None


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
