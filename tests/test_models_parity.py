"""Parity with timm: random timm models of every preset, saved as the hub ships them, converted through the
real checkpoint reader, compared block by block on non-square inputs."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from timm_models import (
    fseg_config,
    make_timm_model,
    random_input,
    relative_error,
    save_hub_files,
    timm_intermediates,
)

from fseg_jax.convert.checkpoint import convert_checkpoint
from fseg_jax.models.config import ViTConfig

TOL = 1e-4  # max |diff| / max |ref|, float32


def _input_for(config, batch=1):
    # non-square, not 224: 22 x 15 patches at patch 16, 25 x 17 at patch 14
    height, width = (352, 240) if config.patch_size == 16 else (350, 238)
    return random_input(height, width, batch=batch, seed=1)


def _assert_parity(model, timm_model, x):
    ref_blocks, ref_final = timm_intermediates(timm_model, x)
    ours = model.forward_intermediates(x)
    assert len(ours) == len(ref_blocks)
    errors = [relative_error(o, r) for o, r in zip(ours, ref_blocks)]
    assert max(errors) <= TOL, f"block errors {errors}"
    (final,) = model.forward_intermediates(x, indices=1, norm=True)
    assert relative_error(final, ref_final) <= TOL
    return errors


@pytest.fixture(scope="module")
def uni_files(tmp_path_factory):
    timm_model = make_timm_model("uni")  # full depth: 24 blocks
    paths = save_hub_files(timm_model, tmp_path_factory.mktemp("uni"))
    yield timm_model, paths
    for path in paths.values():
        path.unlink()


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_uni_full_depth_parity(uni_files, fmt):
    timm_model, paths = uni_files
    config = ViTConfig.from_preset("uni")
    model = convert_checkpoint(paths[fmt], config)
    _assert_parity(model, timm_model, _input_for(config))
    del model
    gc.collect()


# reduced depth, full width (two blocks: the second sees the first's output, so block chaining is tested)
@pytest.mark.parametrize(
    "preset", ["uni2_h", "gigapath", "virchow", "virchow2", "h_optimus_0", "h_optimus_1", "h0_mini"]
)
def test_preset_parity_reduced_depth(preset, tmp_path):
    timm_model = make_timm_model(preset, depth=2)
    config = fseg_config(preset, depth=2)
    paths = save_hub_files(timm_model, tmp_path)
    x = _input_for(config, batch=2)
    for fmt in ("bin", "safetensors"):
        model = convert_checkpoint(paths[fmt], config)
        _assert_parity(model, timm_model, x)


def test_prefix_tokens_and_indices_match_timm():
    import torch

    timm_model = make_timm_model("virchow2", depth=3)
    config = fseg_config("virchow2", depth=3)
    from fseg_jax import convert_timm_state_dict

    model = convert_timm_state_dict(timm_model.state_dict(), config)
    x = _input_for(config)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    for indices in (2, [0, -1], [-2]):
        with torch.no_grad():
            ref = timm_model.forward_intermediates(
                xt, indices=indices, norm=True, return_prefix_tokens=True, intermediates_only=True
            )
        ours = model.forward_intermediates(x, indices=indices, norm=True, return_prefix_tokens=True)
        assert len(ours) == len(ref)
        for (grid, prefix), (ref_grid, ref_prefix) in zip(ours, ref):
            assert prefix.shape == (1, config.num_prefix_tokens, config.embed_dim)
            assert relative_error(grid, ref_grid.permute(0, 2, 3, 1).numpy()) <= TOL
            assert relative_error(prefix, ref_prefix.numpy()) <= TOL


@pytest.mark.parametrize("preset", ["uni", "uni2_h", "virchow2"])
def test_position_embedding_resampling_matches_timm(preset):
    """Shrinking one side of the stored grid (where timm's antialiased bicubic kernel differs from a plain
    one) and the stored grid itself (no resampling), with prefix rows embedded (uni, virchow2) or not
    (uni2_h, registers included)."""
    from fseg_jax import convert_timm_state_dict

    timm_model = make_timm_model(preset, depth=1)
    config = fseg_config(preset, depth=1)
    model = convert_timm_state_dict(timm_model.state_dict(), config)
    p = config.patch_size
    rows, cols = config.pos_embed_grid
    for grid in ((rows // 2 + 1, cols + 3), (rows + 2, cols - 5), (rows, cols)):
        x = random_input(grid[0] * p, grid[1] * p, seed=2)
        _assert_parity(model, timm_model, x)
