"""`fseg-jax concepts import|build`: make safetensors concept banks."""

from __future__ import annotations

import click


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return ks


@click.group()
def concepts():
    """Make concept banks (safetensors) for segmentation."""


@concepts.command("import")
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Bank to write (.safetensors).")
@click.option("--preset", default=None, help="Model the bank belongs to (e.g. uni, gigapath, resnet50).")
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
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}: k = {', '.join(map(str, bank.ks))}, feature dim {bank.feature_dim}")


@concepts.command("build")
@click.argument("model_spec", metavar="MODEL")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--out", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Bank to write (.safetensors).")
@click.option("--k", "ks", default="8,16,32,64,128,256", show_default=True, help="Comma-separated k values.")
@click.option("--layer", default=-1, show_default=True, type=int, help="Block whose features are clustered.")
@click.option("--tile", default=224, show_default=True, type=int, help="Tile side in pixels.")
@click.option("--per-token", is_flag=True, help="Cluster patch tokens instead of per-tile means.")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Tiles per model call.")
@click.option("--seed", default=0, show_default=True, type=int, help="k-means seed.")
def build(model_spec, images, output, ks, layer, tile, per_token, batch_size, seed):
    """Build a bank for MODEL (preset or converted model folder) by k-means over tiles of IMAGES
    (image files or folders of them)."""
    ks = _parse_ks(ks)
    from fseg_jax.concepts import build_concepts, save_concepts
    from fseg_jax.convert.timm import ConversionError
    from fseg_jax.hub import ModelAccessError, load_model

    try:
        model = load_model(model_spec)
    except (ValueError, OSError, ConversionError, ModelAccessError) as e:
        raise click.ClickException(f"cannot load model {model_spec}: {e}") from None
    try:
        bank = build_concepts(
            model, list(images), ks, layer=layer, tile=tile, per_token=per_token, batch_size=batch_size, seed=seed
        )
        path = save_concepts(output, bank)
    except (ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}: k = {', '.join(map(str, bank.ks))}, feature dim {bank.feature_dim}")
