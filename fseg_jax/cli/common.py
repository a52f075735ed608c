"""What the subcommands share: model options, the compilation cache folder, one-line errors.

The command line, not the library, reads the environment: ``$FSEG_JAX_CACHE`` and ``$FSEG_JAX_CONCEPTS_URL``
are resolved here and passed on as arguments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import click

from fseg_jax.options import DTYPES, METHODS, RUN_DEFAULTS, SOLVERS

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def default_cache_root() -> Path:
    """``$FSEG_JAX_CACHE``, default ``~/.cache/fseg_jax``: the command line's compiled programs."""
    return Path(os.environ.get("FSEG_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fseg_jax"))


def default_compilation_cache() -> Path:
    """``$FSEG_JAX_CACHE/jax``, default ``~/.cache/fseg_jax/jax``."""
    return default_cache_root() / "jax"


def resolve_concepts_option(spec: str):
    """The bank ``--concepts`` names: a ``.safetensors`` file, or a preset cached where the library caches it
    (``fseg_jax.concepts.default_cache_dir()``, ``~/.cache/fseg_jax/concepts``) and fetched on first use from
    ``$FSEG_JAX_CONCEPTS_URL`` (a mirror of the upstream folder, ``https://`` or ``file://``), default the
    upstream F-Seg repository."""
    from fseg_jax.concepts import UPSTREAM_URL, resolve_concepts

    return resolve_concepts(spec, base_url=os.environ.get("FSEG_JAX_CONCEPTS_URL") or UPSTREAM_URL)


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


def run_options(command, *, methods: tuple[str, ...] = METHODS):
    """Add the run options of ``fseg_jax.Pipeline.create`` (``fseg_jax.options.RUN_DEFAULTS``), with their
    choices and defaults from ``fseg_jax.options``: --model, --random-init, --depth, --concepts, --k, --method,
    --layer (repeatable), --n-components, --seed, --solver, --tol, --max-iter, --dtype, --bucket and --batch.
    The command receives them under ``Pipeline.create``'s names (``concepts`` and ``model`` as given, ``layer``
    as a tuple); :func:`pipeline_from_options` turns them into the pipeline."""
    d = RUN_DEFAULTS
    options = [
        click.option("--model", "model", default=None,
                     help="Model preset (e.g. uni) or a converted model folder [default: the model the bank records]."),
        random_model_options,
        click.option("--concepts", "concepts", default=None,
                     help="Concept bank: a .safetensors file or a preset (uni, gigapath, resnet50). Not used by dff."),
        click.option("--k", type=int, default=d["k"],
                     help="Bank size to use (optional when the bank holds one; for dff: the number of components)."),
        click.option("--method", type=click.Choice(methods), default=d["method"], show_default=True,
                     help="project: NNLS onto the bank; nearest: most similar concept; factorize: per-image NMF, "
                          "components mapped to the bank; dff: per-image NMF without a bank."),
        click.option("--layer", "layer", type=int, multiple=True, default=(d["layer"],), show_default=True,
                     help="Block whose features are used; repeat to concatenate several blocks."),
        click.option("--n-components", type=int, default=d["n_components"], show_default=True,
                     help="Free NMF components (factorize)."),
        click.option("--seed", type=int, default=d["seed"], show_default=True, help="NMF initialisation seed."),
        click.option("--solver", type=click.Choice(SOLVERS), default=d["solver"],
                     help="NMF solver [default: fseg_jax.factorization's; hals reproduces the original's iterates]."),
        click.option("--tol", type=float, default=d["tol"], help="Solver tolerance [default: the solver's]."),
        click.option("--max-iter", type=int, default=d["max_iter"], help="Solver iteration cap [default: the solver's]."),
        click.option("--dtype", type=click.Choice(DTYPES), default=d["dtype"],
                     help="Compute dtype of the model (bfloat16 for GPU/TPU) [default: float32, the model's own]."),
        click.option("--bucket", type=int, default=d["bucket"],
                     help="Pad images to a multiple of this many pixels so nearby sizes share a compilation."),
        click.option("--batch", "batch", type=int, default=d["batch"], show_default=True,
                     help="Images (slides: tiles) per compiled call, split over all local devices."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def pipeline_from_options(concepts, k, **options):
    """The ``fseg_jax.Pipeline`` of a command's :func:`run_options`, or one line saying why not.

    ``concepts`` is resolved first (:func:`concepts_option`: the cache and ``$FSEG_JAX_CONCEPTS_URL``), the
    rest is passed untouched to ``Pipeline.create``, which checks every value."""
    from fseg_jax.concepts import ConceptBank
    from fseg_jax.convert.engine import ConversionError
    from fseg_jax.hub import ModelAccessError
    from fseg_jax.segmentation import Pipeline

    if options.get("method") == "dff":
        concepts = None
    elif concepts is None:
        raise click.UsageError(f"--concepts is required for method {options.get('method')}")
    spec = None
    if concepts is not None and not isinstance(concepts, ConceptBank):
        spec, concepts = str(concepts), concepts_option(concepts, k)
    if isinstance(options.get("layer"), tuple) and len(options["layer"]) == 1:
        options["layer"] = options["layer"][0]
    try:
        pipeline = Pipeline.create(concepts, k=k, **options)
    except (ValueError, TypeError, OSError, RuntimeError, ConversionError, ModelAccessError) as e:
        raise click.ClickException(one_line(e)) from None
    # the run records the bank as the command line named it (a path or preset), not as the object it became
    return pipeline if spec is None else dataclasses.replace(pipeline, bank_source=spec)


def random_model_options(command):
    """Add ``--random-init SEED`` and ``--depth N``: a random-weight model of a preset, built in memory."""
    command = click.option(
        "--depth", type=int, default=None,
        help="With --random-init: keep only this many blocks (a quicker model for trying the pipeline).",
    )(command)
    return click.option(
        "--random-init", "random_init", type=int, default=None, metavar="SEED",
        help="Random weights of the --model preset's architecture, drawn from SEED and built in memory (nothing "
             "is downloaded or written). For trying the pipeline without the weights: its segmentations mean nothing.",
    )(command)


def model_from_options(spec: str | None, random_init: int | None, depth: int | None):
    """The model the options name: a random model, a loaded one (cached), or None (the bank's own)."""
    from fseg_jax.convert.engine import ConversionError
    from fseg_jax.hub import ModelAccessError, random_model, resolve_model

    if depth is not None and random_init is None:
        raise click.UsageError("--depth applies to --random-init models only")
    if spec is None:
        if random_init is not None:
            raise click.UsageError("--random-init needs --model PRESET, the architecture to draw weights for")
        return None
    try:
        if random_init is not None:
            return random_model(spec, seed=random_init, depth=depth)
        return resolve_model(spec)
    except (ValueError, OSError, ConversionError, ModelAccessError) as e:
        raise click.ClickException(f"cannot load model {spec}: {one_line(e)}") from None


def one_line(error: BaseException) -> str:
    """`error` as one line; a file system error as :func:`os_error_line` words it."""
    if isinstance(error, OSError):
        return os_error_line(error)
    return _flat(error)


def _flat(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# what to do about a file system error, by errno
_ADVICE = {
    getattr(errno, "EDQUOT", errno.ENOSPC): "free some space or write elsewhere",
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EROFS: "write elsewhere",
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOENT: "check the path",
}


def os_error_line(err: OSError) -> str:
    """One line for a file system error: the file it concerns, what went wrong and what to do."""
    line = err.strerror or _flat(err)
    if err.filename is not None:
        where = os.fspath(err.filename)
        if err.filename2 is not None:
            where = f"{where} -> {os.fspath(err.filename2)}"
        line = f"{where}: {line[:1].lower()}{line[1:]}"
    advice = _ADVICE.get(err.errno)
    return f"{line}; {advice}" if advice else line


class Interrupted(click.ClickException):
    """Ctrl-C: one line and exit status 130."""

    exit_code = INTERRUPTED

    def __init__(self):
        super().__init__("interrupted (Ctrl-C)")


@contextlib.contextmanager
def explained_errors() -> Iterator[None]:
    """Turn what any command may meet into one line and an exit status: a file system error (full disk,
    read-only or missing folder, a file where a folder should be, ...) exits 1 naming the file, Ctrl-C exits
    130. Every subcommand runs inside it (see ``fseg_jax.cli.main``)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted() from None
    except OSError as err:
        raise click.ClickException(os_error_line(err)) from None
