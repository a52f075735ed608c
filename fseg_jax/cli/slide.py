"""`fseg-jax slide`: segment whole slides into concepts (OME-TIFF labels, QuPath GeoJSON, overlay, summary)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("slide")
@click.argument("slides", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model", help="Model preset (uni, gigapath, ...) or a converted-model folder.")
@click.option("--concepts", "concepts", help="Concept bank: .safetensors file or preset (uni, gigapath, resnet50).")
@click.option("--k", "k", type=int, help="Number of concepts (one of the bank's k).")
@click.option("--method", type=click.Choice(["project", "nearest", "factorize"]), default="project", show_default=True)
@click.option("--layer", type=int, default=-1, show_default=True, help="Block whose tokens are used.")
@click.option("--mpp", type=float, default=0.5, show_default=True, help="Working microns per pixel (0.5 ~ 20x).")
@click.option("--slide-mpp", type=float, help="The slides' own microns per pixel, for files that do not record it.")
@click.option("--tile", type=int, default=1024, show_default=True, help="Tile side in working pixels (multiple of the patch).")
@click.option("--margin", type=int, help="Context discarded on each tile side, in pixels [default: tile/16].")
@click.option("--batch", type=int, default=16, show_default=True, help="Tiles per step, split over all local devices.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--save-weights", is_flag=True, help="Also write the token weights (weights.safetensors).")
@click.option("--distributed", is_flag=True, help="Join a jax.distributed run: this process computes its share of tiles.")
@click.option("--merge", "merge_only", is_flag=True, help="Only write the outputs of a finished multi-process run.")
@click.option("--compilation-cache", type=click.Path(file_okay=False), default=None,
              help="JAX compilation cache folder [default: $FSEG_JAX_CACHE/jax or ~/.cache/fseg_jax/jax].")
@click.option("--no-compilation-cache", is_flag=True, help="Do not use the persistent compilation cache.")
@click.option("-o", "--out", "--output", "out_root", type=click.Path(path_type=Path), required=True, help="Output folder (one sub-folder per slide).")
def slide(slides, model, concepts, k, method, layer, mpp, slide_mpp, tile, margin, batch, dtype, save_weights,
          distributed, merge_only, compilation_cache, no_compilation_cache, out_root):
    """Segment SLIDES (a slide, an image, or a folder of them) into OUT/<slide name>/.

    Writes labels.ome.tif (0 = background, i+1 = concept i), labels.geojson (QuPath annotations),
    overlay.png and summary.json per slide. A re-run resumes an interrupted one; a slide that fails is
    reported and skipped.
    """
    from fseg_jax.wsi.pipeline import SlideFailure, find_slides, slide_folder_name, merge_slide, segment_slides

    if merge_only:
        failed = 0
        for path in find_slides(slides):
            try:
                summary = merge_slide(out_root / slide_folder_name(path))
                click.echo(f"{path.name}: merged, {summary['tiles']['tissue']} tiles")
            except ValueError as err:
                failed += 1
                click.echo(f"{path.name}: {err}", err=True)
        raise SystemExit(1 if failed else 0)

    if model is None or concepts is None or k is None:
        raise click.UsageError("--model, --concepts and --k are required (except with --merge)")
    if not no_compilation_cache:
        from fseg_jax.cli.common import default_compilation_cache
        from fseg_jax.compilation import enable_compilation_cache

        enable_compilation_cache(compilation_cache or default_compilation_cache())
    if distributed:
        import jax

        jax.distributed.initialize()

    from fseg_jax.wsi.pipeline import SlideSegmenter

    segmenter = SlideSegmenter.from_model(
        model, concepts, k=k, method=method, layer=layer, dtype=None if dtype == "float32" else dtype,
        tile=tile, margin=margin, batch=batch, mpp=mpp, save_weights=save_weights,
    )

    def report(result) -> None:
        if isinstance(result, SlideFailure):
            click.echo(f"FAILED {result.slide.name}: {result.error}", err=True)
        elif not result.complete:
            click.echo(f"{result.slide.name}: share done ({result.tiles_computed} tiles); run --merge when all are")
        else:
            note = "already done" if result.tiles_computed == 0 and result.tiles else f"{result.tiles_computed} tiles computed"
            click.echo(f"{result.slide.name}: {result.tiles} tissue tiles, {note}, {result.seconds:.1f} s -> {result.out_dir}")

    results = segment_slides(slides, out_root, segmenter, slide_mpp=slide_mpp, progress=True, on_result=report)
    failures = [r for r in results if isinstance(r, SlideFailure)]
    if failures:
        click.echo(f"{len(failures)} of {len(results)} slides failed", err=True)
        raise SystemExit(1)
