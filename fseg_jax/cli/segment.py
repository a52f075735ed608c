"""`fseg-jax segment`: label maps and overlays for image files, a thin shell over `fseg_jax.segment`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fseg_jax.cli.common import default_compilation_cache, one_line, pipeline_from_options, run_options
from fseg_jax.compilation import enable_compilation_cache

OUTPUT_SUFFIXES = ("_labels.png", "_labels.npy", "_overlay.png")  # what one image's outputs are named


def _expand_inputs(paths: tuple[str, ...]) -> list[Path]:
    from fseg_jax.io import expand_image_paths

    try:
        files = expand_image_paths(paths)
    except (ValueError, OSError) as e:
        raise click.ClickException(one_line(e)) from None
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise click.ClickException(f"two inputs would write the same outputs: {stems[f.stem]} and {f}")
        stems[f.stem] = f
    return files


def write_outputs(
    out_dir: Path, stem: str, image, labels, *, alpha: float, legend: bool, classes=None, class_labels: bool = False
) -> None:
    """Write ``<stem>_labels.png``, ``<stem>_labels.npy`` and ``<stem>_overlay.png`` for concept `labels`: all
    three, or (on any error) none.

    classes: the bank's classes (``ConceptBank.classes``): the overlay shows them; class_labels: the label
    files hold class indices instead of concept indices.
    """
    import numpy as np
    from PIL import Image

    from fseg_jax._files import atomic_paths
    from fseg_jax.io import to_uint8
    from fseg_jax.visualize import overlay

    concept_labels = np.asarray(labels)
    labels = classes.map(concept_labels) if class_labels else concept_labels
    if labels.max(initial=0) < 256:
        png = Image.fromarray(labels.astype(np.uint8))  # 8-bit grayscale
    else:
        png = Image.fromarray(labels.astype(np.uint16))  # 16-bit grayscale
    picture = overlay(to_uint8(image), concept_labels, alpha=alpha, legend=legend, classes=classes)
    names = [out_dir / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]
    with atomic_paths(*names) as (png_path, npy_path, overlay_path):  # the three files, or none of them
        png.save(png_path, format="PNG")
        np.save(npy_path, labels.astype(np.int32))
        Image.fromarray(picture).save(overlay_path, format="PNG")


@click.command()
@click.argument("images", nargs=-1, metavar="IMAGE...")
@click.option("--sample", is_flag=True,
              help="Also segment the H&E sample that ships with fseg_jax (a CC0 crop of OpenSlide's CMU-1-Small-Region).")
@run_options
@click.option("--alpha", type=float, default=0.5, show_default=True, help="Overlay opacity, in [0, 1].")
@click.option("--legend/--no-legend", default=True, show_default=True, help="Legend strip under the overlay.")
@click.option("--classes", "class_labels", is_flag=True,
              help="Label files hold classes (the bank's concepts grouped by name) instead of concepts.")
@click.option("--compilation-cache", type=click.Path(file_okay=False), default=None,
              help="JAX compilation cache folder [default: $FSEG_JAX_CACHE/jax or ~/.cache/fseg_jax/jax].")
@click.option("--no-compilation-cache", is_flag=True, help="Do not use the persistent compilation cache.")
@click.option("-o", "--out", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for <name>_labels.png, <name>_labels.npy and <name>_overlay.png.")
def segment(images, sample, alpha, legend, class_labels, compilation_cache, no_compilation_cache, out_dir,
            concepts, k, **options):
    """Segment IMAGE... (files or folders of images) into concepts.

    Writes, per image, the label map as PNG (8-bit, or 16-bit when a label exceeds 255) and .npy (int32),
    and the overlay of the labels on the image as PNG. When the bank names the concepts of this k
    (fseg-jax concepts name), the overlay colours and lists their classes (concepts sharing a name as one),
    and --classes writes class indices, in the order `fseg-jax concepts name BANK --k K` lists them.
    """
    from fseg_jax.options import check_alpha

    try:
        check_alpha(alpha)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--alpha") from None
    if options["method"] == "dff" and class_labels:
        raise click.UsageError("--classes needs a concept bank; method dff uses none")
    if not images and not sample:
        raise click.UsageError("give IMAGE... to segment, or --sample")
    if sample:
        from fseg_jax.data import sample_image_path

        images = (str(sample_image_path()), *images)
    files = _expand_inputs(images)
    if not no_compilation_cache:
        enable_compilation_cache(compilation_cache or default_compilation_cache())

    from tqdm import tqdm

    from fseg_jax.io import read_image

    pipeline = pipeline_from_options(concepts, k, **options)
    if class_labels and pipeline.classes is None:
        raise click.ClickException(
            f"--classes needs a bank whose concepts are named, and this bank has no names for k={pipeline.k} "
            f"(name them with: fseg-jax concepts name BANK --k {pipeline.k} INDEX=NAME...)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # once the run is known to be valid, before any image is read

    failed: list[Path] = []

    def fail(path: Path, err: Exception) -> None:
        """Report an input that cannot be segmented; the others go on (one input: the error itself)."""
        reason = one_line(err) if str(path) in str(err) else f"{path}: {one_line(err)}"
        if len(files) == 1:
            raise click.ClickException(reason)
        failed.append(path)
        tqdm.write(f"FAILED {reason}", file=sys.stderr)
        bar.update(1)

    with tqdm(total=len(files), unit="image", desc="segment", disable=None) as bar:
        for start in range(0, len(files), pipeline.batch):
            chunk = []
            for f in files[start:start + pipeline.batch]:
                try:
                    chunk.append((f, read_image(f)))
                except (ValueError, OSError) as e:
                    fail(f, e)
            for f, picture, lab in _segmented(pipeline, chunk, fail):
                write_outputs(out, f.stem, picture, lab, alpha=alpha, legend=legend, classes=pipeline.classes,
                              class_labels=class_labels)
                bar.update(1)
    done = len(files) - len(failed)
    click.echo(f"wrote {len(OUTPUT_SUFFIXES) * done} files for {done} image(s) to {out}")
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(files)} images failed (listed above); they have no outputs")


def _segmented(pipeline, chunk, fail):
    """(path, image, labels) of each (path, image) of `chunk` that segments; a batch that fails is tried image
    by image, so that only the images that fail are reported (through `fail`)."""
    if not chunk:
        return []
    try:
        result = pipeline.segment([picture for _, picture in chunk])
    except (ValueError, TypeError) as e:
        if len(chunk) == 1:
            fail(chunk[0][0], e)
            return []
        return [item for one in chunk for item in _segmented(pipeline, [one], fail)]
    labels = result.labels if pipeline.method == "dff" else result
    return [(f, picture, lab) for (f, picture), lab in zip(chunk, labels)]
