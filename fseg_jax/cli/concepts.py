"""`fseg-jax concepts import|build|learn|atlas|name`: make concept banks, show what their concepts are, name them."""

from __future__ import annotations

import functools
import re

import click

from fseg_jax.cli.common import (
    model_from_options,
    one_line,
    pipeline_from_options,
    random_model_options,
    run_options,
)
from fseg_jax.options import BUILD_KS, LEARN_KS, RUN_DEFAULTS, SLIDE_DEFAULTS


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return ks


def _known_preset(name: str | None) -> str | None:
    """`name` when it is a model preset (or None); a usage error listing the presets otherwise."""
    from fseg_jax.models.config import preset_names

    if name is not None and name not in preset_names():
        raise click.BadParameter(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    return name


@click.group()
def concepts():
    """Make concept banks (safetensors) for segmentation."""


@concepts.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Bank to write (.safetensors).")
@click.option("--preset", default=None, callback=lambda ctx, param, value: _known_preset(value),
              help="Model the bank belongs to (e.g. uni, gigapath, resnet50).")
@click.option("--layer", default=-1, show_default=True, type=int, help="Block the features came from.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling SOURCE (this runs code stored in the file).")
def import_(source, output, preset, layer, trust_pickle):
    """Convert an upstream F-Seg bank (a joblib pickle of {k: (k, d)}) into a safe .safetensors bank.

    Unpickling runs code from the file: pass --trust-pickle only for a file from a source you trust.
    """
    from fseg_jax.concepts import import_joblib_concepts, save_concepts

    if not trust_pickle:
        raise click.ClickException(
            f"refusing to unpickle {source}: loading a joblib file runs code stored in it; "
            "add --trust-pickle if you trust its source"
        )
    try:
        bank = import_joblib_concepts(source, trust_pickle=True, model=preset, layer=layer)
        path = save_concepts(output, bank)
    except (ValueError, OSError, ImportError) as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"wrote {path}: k = {', '.join(map(str, bank.ks))}, feature dim {bank.feature_dim}")


def _bank_from_images(command):
    """The inputs `build` and `learn` share: MODEL, IMAGE..., --sample, --random-init/--depth, -o."""
    for option in reversed([
        click.argument("model_spec", metavar="MODEL"),
        click.argument("images", nargs=-1, type=click.Path(exists=True)),
        click.option("--sample", is_flag=True, help="Also use the H&E sample that ships with fseg_jax."),
        random_model_options,
        click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False),
                     help="Bank to write (.safetensors)."),
    ]):
        command = option(command)
    return command


def _write_bank(make, model_spec, random_init, depth, images, sample, output) -> None:
    """Resolve the model and the images (with --sample), ``make(model, images)`` a bank, save it, report."""
    from fseg_jax.concepts import save_concepts

    if not images and not sample:
        raise click.UsageError("give IMAGE... (files or folders), or --sample")
    if sample:
        from fseg_jax.data import sample_image_path

        images = (str(sample_image_path()), *images)
    model = model_from_options(model_spec, random_init, depth)
    try:
        path = save_concepts(output, bank := make(model, list(images)))
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"wrote {path}: k = {', '.join(map(str, bank.ks))}, feature dim {bank.feature_dim}")


@concepts.command("build")
@_bank_from_images
@click.option("--k", "ks", default=",".join(map(str, BUILD_KS)), show_default=True, help="Comma-separated k values.")
@click.option("--layer", default=-1, show_default=True, type=int, help="Block whose features are clustered.")
@click.option("--tile", default=224, show_default=True, type=int, help="Tile side in pixels.")
@click.option("--per-token", is_flag=True, help="Cluster patch tokens instead of per-tile means.")
@click.option("--batch", "batch", default=RUN_DEFAULTS["batch"], show_default=True, type=int, help="Tiles per model call.")
@click.option("--seed", default=0, show_default=True, type=int, help="k-means seed.")
def build(model_spec, images, sample, random_init, depth, output, ks, layer, tile, per_token, batch, seed):
    """Build a bank for MODEL (preset or converted model folder) by k-means over tiles of IMAGES
    (image files or folders of them).

    The bank records MODEL (the preset name, or the folder as an absolute path), so `fseg-jax segment` and
    `fseg_jax.segment` find the model from the bank alone; a --random-init model is recorded as
    `<preset>-random`, which names no weights.
    """
    from fseg_jax.concepts import build_concepts

    ks = _parse_ks(ks)
    _write_bank(
        lambda model, files: build_concepts(model, files, ks, layer=layer, tile=tile, per_token=per_token,
                                            batch=batch, seed=seed),
        model_spec, random_init, depth, images, sample, output,
    )


@concepts.command("learn")
@_bank_from_images
@click.option("--k", "ks", default=",".join(map(str, LEARN_KS)), show_default=True, help="Comma-separated k values.")
@click.option("--layer", default=-1, show_default=True, type=int, help="Block whose tokens are used.")
@click.option("--tile", default=224, show_default=True, type=int, help="Tile side in pixels.")
@click.option("--tokens-per-tile", default=None, type=int, help="Tokens drawn per tile (default: all).")
@click.option("--steps", default=300, show_default=True, type=int, help="Optimiser steps per k.")
@click.option("--batch-tokens", default=2048, show_default=True, type=int, help="Tokens per step.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the start and the batches.")
@click.option("--checkpoint-dir", default=None, type=click.Path(file_okay=False),
              help="Save each k's state here as it learns; a rerun with the same folder resumes.")
def learn(model_spec, images, sample, random_init, depth, output, ks, layer, tile, tokens_per_tile, steps,
          batch_tokens, seed, checkpoint_dir):
    """Learn a bank for NNLS projection of MODEL's tokens over IMAGES (files or folders of them).

    Starts from k-means++ seeds of the tokens and improves the bank for what segmentation does with it:
    non-negative least squares (see fseg_jax.learning). The bank records MODEL, as `concepts build` does.
    """
    from fseg_jax.learning import learn_concepts

    ks = _parse_ks(ks)
    _write_bank(
        lambda model, files: learn_concepts(
            model, files, ks, layer=layer, tile=tile, tokens_per_tile=tokens_per_tile, seed=seed, steps=steps,
            batch_tokens=batch_tokens, checkpoint_dir=checkpoint_dir,
        ),
        model_spec, random_init, depth, images, sample, output,
    )


@concepts.command("atlas")
@click.argument("images", nargs=-1, type=click.Path(exists=True))
@functools.partial(run_options, methods=("project",))
@click.option("--sample", is_flag=True, help="Also use the H&E sample that ships with fseg_jax.")
@click.option("--n", default=8, show_default=True, type=int, help="Patches per concept.")
@click.option("--patch", default=64, show_default=True, type=int, help="Patch side in pixels.")
@click.option("--mpp", type=float, default=SLIDE_DEFAULTS["mpp"], show_default=True, help="Slides: working microns per pixel.")
@click.option("--slide-mpp", type=float, help="Slides: their own microns per pixel, for files that do not record it.")
@click.option("--tile", type=int, help="Slides: tile side in working pixels [default: 512 rounded down to whole patches].")
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Atlas picture to write (.png); its numbers go beside it as .json.")
def atlas(images, sample, n, patch, mpp, slide_mpp, tile, output, concepts, k, **options):
    """Show what each concept of a bank is: the patches of IMAGES (image or slide files, or folders of them)
    where it weighs most.

    Slides are read in tissue tiles at --mpp. Writes one PNG (a row per concept: its colour and index, then
    its N strongest patches) and a JSON file with each concept's share of tokens, mean weight and the
    patches' sources (for slides also their level-0 pixel position).
    """
    from fseg_jax.atlas import concept_atlas, save_atlas
    from fseg_jax.io import IMAGE_SUFFIXES, expand_image_paths
    from fseg_jax.wsi.reader import SLIDE_SUFFIXES

    if not images and not sample:
        raise click.UsageError("give IMAGE... (files or folders), or --sample")
    try:
        files = expand_image_paths(images, sorted(SLIDE_SUFFIXES.union(IMAGE_SUFFIXES)))
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    if sample:
        from fseg_jax.data import sample_image_path

        files = [sample_image_path(), *files]
    pipeline = pipeline_from_options(concepts, k, **options)
    try:
        result = concept_atlas((str(f) for f in files), pipeline=pipeline, n=n, patch=patch, mpp=mpp,
                               slide_mpp=slide_mpp, tile=tile)
        png, numbers = save_atlas(output, result)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        raise click.ClickException(one_line(e)) from None
    click.echo(f"wrote {png} and {numbers}: {result.weights.shape[0]} concepts over {result.tokens} tokens")


_INDEX = re.compile(r"-?[0-9]+")


def _parse_assignments(items: tuple[str, ...], what: str, param: str) -> dict[int, str]:
    """``("3=tumour", "5=stroma")`` as {3: "tumour", 5: "stroma"}; a usage error naming `param` for an item
    whose INDEX is not a whole number in ASCII digits."""
    out = {}
    for item in items:
        index, sep, value = item.partition("=")
        if not sep or not _INDEX.fullmatch(index.strip()):
            raise click.BadParameter(f"expected INDEX={what} with INDEX a concept number, got {item!r}",
                                     param_hint=param)
        out[int(index)] = value
    return out


@concepts.command("name")
@click.argument("bank_path", metavar="BANK", type=click.Path(exists=True, dir_okay=False))
@click.argument("assignments", nargs=-1, metavar="INDEX=NAME...")
@click.option("--k", type=int, default=None, help="Which k of the bank (needed when it holds several).")
@click.option("--color", "colors", multiple=True, metavar="INDEX=#RRGGBB", help="A concept's colour; repeatable.")
@click.option("--clear", is_flag=True, help="Drop this k's names and colours before setting the new ones.")
@click.option("-o", "--out", "--output", "output", default=None, type=click.Path(dir_okay=False),
              help="Bank to write [default: rewrite BANK in place].")
def name(bank_path, assignments, k, colors, clear, output):
    """Name the concepts of one k of BANK (a .safetensors bank): INDEX=NAME... and --color INDEX=#RRGGBB.

    Concepts given the same name form one class, which segment, slide and the overlays show as one region
    (`3=tumour 5=stroma 7=stroma`). Names and colours add to those the bank already has (--clear: replace
    them). BANK is rewritten atomically (or -o writes a new bank); on any error nothing is written. Without
    INDEX=NAME, --color or --clear, prints the classes only.
    """
    from fseg_jax.concepts import load_concepts, save_concepts

    names = _parse_assignments(assignments, "NAME", "'INDEX=NAME...'")
    given_colors = _parse_assignments(colors, "#RRGGBB", "'--color'")
    try:
        bank = load_concepts(bank_path)
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    if k is None:
        if len(bank.ks) != 1:
            raise click.UsageError(f"--k is required: the bank holds k in {', '.join(map(str, bank.ks))}")
        k = bank.ks[0]
    if k not in bank:
        raise click.ClickException(f"k={k} is not in {bank_path}; it holds k = {', '.join(map(str, bank.ks))}")
    changed = bool(names or given_colors or clear)
    try:
        if changed:
            bank = bank.with_names(k, names, given_colors, clear=clear)
            save_concepts(output or bank_path, bank)
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    if changed:
        click.echo(f"wrote {output or bank_path}")
    if not bank.has_names(k):
        click.echo(f"k={k}: no names")
        return
    classes = bank.classes(k)
    shown = [j for j in range(len(classes)) if classes.is_named(j) or classes.colors[j] is not None]
    click.echo(f"k={k}: {len(classes)} classes")
    for j in shown:
        members = ", ".join(map(str, classes.concepts[j]))
        click.echo(f"  {classes.names[j]:<24} {classes.colors[j] or '-':<8} concepts {members}")
    unnamed = [str(classes.concepts[j][0]) for j in range(len(classes)) if j not in shown]
    if unnamed:
        click.echo(f"  without a name: concepts {', '.join(unnamed)}")
