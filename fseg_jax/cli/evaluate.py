"""`fseg-jax evaluate`: score label maps against annotation masks, a thin shell over `fseg_jax.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fseg_jax.evaluation import MATCHINGS

LABEL_SUFFIXES = (".npy", ".png", ".tif", ".tiff")
PREDICTION_SUFFIX = "_labels"  # `fseg-jax segment` names a label map NAME_labels.*, beside NAME_overlay.png


@click.command()
@click.argument("pred", type=click.Path(exists=True))
@click.argument("target", type=click.Path(exists=True))
@click.option("--matching", type=click.Choice(MATCHINGS), default="hungarian", show_default=True,
              help="Concepts to classes: one-to-one, or each concept to its majority class.")
@click.option("--ignore-index", type=int, default=None, help="Target value of pixels to leave out (e.g. 255).")
@click.option("-o", "--out", "--output", "output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report (scores, mapping, confusion matrix, the pairs) to this JSON file.")
def evaluate(pred, target, matching, ignore_index, output):
    """Score the label maps in PRED against the masks in TARGET (two files, or two folders paired by name).

    Label maps are .npy or PNG/TIFF files of integer labels (palette PNGs are read as their indices); in a
    folder, the label maps are the files named NAME_labels.* (as `fseg-jax segment` writes them; its
    NAME_overlay.png is not one), each paired with the mask NAME.*.
    """
    import warnings

    from fseg_jax._files import atomic_path
    from fseg_jax.evaluation import evaluate as run

    pairs = _pair(Path(pred), Path(target))
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)  # before the work: a path that cannot be written fails here
    try:
        preds = [_read_labels(p) for p, _ in pairs]
        targets = [_read_labels(t) for _, t in pairs]
        for (p, t), a, b in zip(pairs, preds, targets):
            if a.shape != b.shape:
                raise ValueError(f"{p} is {a.shape[0]}x{a.shape[1]} but {t} is {b.shape[0]}x{b.shape[1]}; "
                                 "label maps and masks must have the same size")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run(preds, targets, matching=matching, ignore_index=ignore_index)
    except (ValueError, TypeError) as err:
        raise click.ClickException(str(err)) from None
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    click.echo(f"{len(pairs)} pair(s), {result.pixels} pixels, matching {matching}")
    click.echo("class  IoU     concepts")
    for cls, iou in enumerate(result.iou):
        concepts = ",".join(str(c) for c in (result.mapping == cls).nonzero()[0]) or "-"
        click.echo(f"{cls:5d}  {'   -  ' if iou != iou else f'{iou:.4f}'}  {concepts}")
    click.echo(f"mIoU {result.miou:.4f}  pixel accuracy {result.pixel_accuracy:.4f}")
    if output:
        report = {**result.to_dict(), "pairs": [[str(p), str(t)] for p, t in pairs]}
        with atomic_path(output) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {output}")


def _pair(pred: Path, target: Path) -> list[tuple[Path, Path]]:
    if pred.is_file() and target.is_file():
        return [(pred, target)]
    if pred.is_file() or target.is_file():
        raise click.UsageError("PRED and TARGET must both be files or both be folders")
    preds, targets = _label_files(pred, PREDICTION_SUFFIX), _label_files(target, None)
    if not preds:
        raise click.ClickException(
            f"no label maps in {pred}: they are the files named NAME{PREDICTION_SUFFIX}"
            f"{{{','.join(LABEL_SUFFIXES)}}}, as fseg-jax segment writes them"
        )
    if not targets:
        raise click.ClickException(f"no label files ({', '.join(LABEL_SUFFIXES)}) in {target}")
    missing_t = sorted(set(preds) - set(targets))
    missing_p = sorted(set(targets) - set(preds))
    if missing_t or missing_p:
        parts = []
        if missing_t:
            parts.append(f"no mask in {target} for {', '.join(missing_t[:5])}")
        if missing_p:
            parts.append(f"no prediction in {pred} for {', '.join(missing_p[:5])}")
        raise click.ClickException("; ".join(parts) + " (files pair by name)")
    return [(preds[name], targets[name]) for name in sorted(preds)]


def _label_files(folder: Path, suffix: str | None) -> dict[str, Path]:
    """name -> file: with `suffix`, only the files named NAME<suffix>.* (keyed by NAME); of several files with
    one name, the first suffix of LABEL_SUFFIXES wins (.npy first)."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (LABEL_SUFFIXES.index(p.suffix.lower())
                                                         if p.suffix.lower() in LABEL_SUFFIXES else 99, p.name)):
        if not path.is_file() or path.suffix.lower() not in LABEL_SUFFIXES or path.name.startswith("."):
            continue
        name = path.stem
        if suffix:
            if not name.endswith(suffix):
                continue
            name = name[: -len(suffix)]
        found.setdefault(name, path)
    return found


def _read_labels(path: Path):
    """An (H, W) integer label map from a .npy or image file; ValueError naming the file otherwise."""
    import numpy as np

    if path.suffix.lower() == ".npy":
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as err:
            raise ValueError(f"cannot read {path} as a .npy array: {err}") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                if im.mode not in ("P", "L", "I", "I;16", "1", "F"):
                    raise ValueError(f"{path} is a {im.mode} image; save label maps as indices (palette or grayscale)")
                labels = np.asarray(im).astype(np.uint8) if im.mode == "1" else np.asarray(im)
        except UnidentifiedImageError:
            raise ValueError(f"cannot read {path} as an image (format not recognised)") from None
        except OSError as err:
            if err.errno is not None:  # the file system's error, which names the file
                raise
            raise ValueError(f"cannot read {path}: {err} (the file is damaged or incomplete)") from None
    if labels.ndim != 2:
        raise ValueError(f"{path}: expected an (H, W) label map, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path} holds {labels.dtype} values; label maps are integers (0, 1, 2, ...)")
    return labels
