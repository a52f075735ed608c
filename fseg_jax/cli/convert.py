"""``fseg-jax convert``: a timm checkpoint (hub or local file) -> a converted model directory."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(name="convert")
@click.option("--preset", help="Architecture preset (uni, uni2_h, gigapath, virchow, virchow2, h_optimus_0, "
              "h_optimus_1, h0_mini, resnet50). Without --checkpoint, its weights are fetched from the hub.")
@click.option("--timm-config", "timm_config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A timm hub config.json (architecture + model_args) instead of --preset.")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Local checkpoint: model.safetensors (no torch needed) or pytorch_model.bin.")
@click.option("--revision", help="Hub revision, overriding the one pinned in the preset's manifest.")
@click.option("--random-init", "random_seed", type=int, default=None, metavar="SEED",
              help="No checkpoint: random weights of the preset's architecture, drawn from SEED, named "
              "<preset>-random (as `segment --random-init` names it). For trying the pipeline without access to "
              "the gated weights; its segmentations mean nothing.")
@click.option("--depth", type=int, default=None,
              help="With --random-init: keep only this many blocks (a quicker model for trying the pipeline).")
@click.option("-o", "--out", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (model.safetensors + config.json).")
def convert(preset, timm_config, checkpoint, revision, random_seed, depth, out):
    """Convert a timm / torchvision checkpoint to an fseg_jax model directory (loadable with load_model)."""
    from fseg_jax.convert.checkpoint import convert_checkpoint
    from fseg_jax.convert.engine import ConversionError
    from fseg_jax.hub import ModelAccessError, download_checkpoint, model_summary, save_model
    from fseg_jax.models.config import ViTConfig, config_from_preset
    from fseg_jax.models.weights import preset_layout

    if (preset is None) == (timm_config is None):
        raise click.UsageError("give exactly one of --preset and --timm-config")
    if timm_config is not None and checkpoint is None and random_seed is None:
        raise click.UsageError("--timm-config needs --checkpoint (or --random-init)")
    if revision is not None and checkpoint is not None:
        raise click.UsageError("--revision selects a hub download; drop it when converting a local --checkpoint")
    if depth is not None and random_seed is None:
        raise click.UsageError("--depth applies to --random-init models only")
    if random_seed is not None and (checkpoint is not None or revision is not None):
        raise click.UsageError("--random-init makes weights without a checkpoint; drop --checkpoint and --revision")
    try:
        if preset is not None:
            config = config_from_preset(preset)
        else:
            config = ViTConfig.from_timm(_read_json(timm_config), name=timm_config.parent.name)
        if random_seed is not None:
            from fseg_jax.hub import random_model_of

            checkpoint = f"random weights (seed {random_seed})"
            model = random_model_of(config, seed=random_seed, depth=depth)
        else:
            if checkpoint is None:
                checkpoint = download_checkpoint(preset, revision=revision)
            layout = preset_layout(preset) if preset is not None else "timm"
            model = convert_checkpoint(checkpoint, config, layout=layout)
    except (ConversionError, ModelAccessError, ValueError, ImportError) as err:
        raise click.ClickException(str(err)) from err
    save_model(model, out)
    info = model_summary(model)
    click.echo(
        f"converted {info['name']} (depth {info['depth']}, width {info['embed_dim']}, patch {info['patch_size']}, "
        f"{info['parameters'] / 1e6:.1f}M parameters) from {checkpoint} -> {out}"
    )


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; a ValueError naming the file when it holds none."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file ({err}); give a timm config.json") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object; give a timm config.json")
    return value
