"""Conversion: strict key accounting with all problems in one error, damaged files, torch-free safetensors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from timm_models import fseg_config, make_timm_model, random_input, relative_error, save_hub_files

from fseg_jax import convert_timm_state_dict
from fseg_jax.convert.checkpoint import convert_checkpoint, open_checkpoint
from fseg_jax.convert.engine import ConversionError


@pytest.fixture(scope="module")
def small():
    """h0_mini reduced to one block (full width 768): a timm model, its config and its state dict."""
    timm_model = make_timm_model("h0_mini", depth=1)
    return timm_model, fseg_config("h0_mini", depth=1), dict(timm_model.state_dict())


def test_torch_and_numpy_state_dicts_convert_alike(small):
    timm_model, config, state = small
    numpy_state = {k: v.numpy() for k, v in state.items()}
    x = random_input(56, 42)
    a = convert_timm_state_dict(state, config).forward_intermediates(x)[0]
    b = convert_timm_state_dict(numpy_state, config).forward_intermediates(x)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the caller's dict is untouched
    assert set(state) == set(timm_model.state_dict())


def test_head_is_ignored_by_name(small):
    _, config, state = small
    with_head = {**state, "head.weight": torch.zeros(10, 768), "head.bias": torch.zeros(10)}
    convert_timm_state_dict(with_head, config)


def test_every_problem_is_reported_in_one_error(small):
    _, config, state = small
    broken = dict(state)
    del broken["blocks.0.ls1.gamma"]  # missing
    broken["blocks.0.attn.q_norm.weight"] = torch.ones(64)  # extra, unknown to the rules
    broken["blocks.1.norm1.weight"] = torch.ones(768)  # extra: a block the config does not have
    broken["pos_embed"] = torch.zeros(1, 197, 768)  # wrong shape
    with pytest.raises(ConversionError) as err:
        convert_timm_state_dict(broken, config)
    message = str(err.value)
    assert len(err.value.problems) == 4
    assert "missing key for parameter 'blocks.0.ls1.gamma'" in message
    assert "unexpected key 'blocks.0.attn.q_norm.weight'" in message
    assert "unexpected key 'blocks.1.norm1.weight'" in message
    assert "shape mismatch for 'pos_embed': checkpoint (1, 197, 768)" in message


def test_wrong_architecture_is_refused(small):
    _, _, state = small
    with pytest.raises(ConversionError, match="does not match the 'uni' architecture"):
        convert_timm_state_dict(state, fseg_config("uni", depth=1))


def test_corrupt_files_are_reported(small, tmp_path):
    timm_model, config, _ = small
    paths = save_hub_files(timm_model, tmp_path)
    for fmt, path in paths.items():
        data = path.read_bytes()
        damaged = tmp_path / f"damaged_{path.name}"
        damaged.write_bytes(data[: len(data) // 2])
        with pytest.raises(ConversionError, match="cannot read"):
            convert_checkpoint(damaged, config)
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ConversionError, match="cannot read checkpoint"):
        open_checkpoint(garbage)
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "weights.npz")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "absent.safetensors")


def test_a_pickle_that_is_not_weights_only_is_refused(tmp_path):
    import pickle

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"x": slice(1, 2)}))  # a plain pickle, not a torch weights-only zip
    with pytest.raises(ConversionError, match="cannot read checkpoint"):
        open_checkpoint(path)


def test_safetensors_conversion_needs_no_torch_and_bounded_memory(tmp_path):
    """Convert a 6-block giant checkpoint (~0.7 GB) in a process where torch cannot be imported; the peak
    resident memory added by the conversion stays within twice the weights' size (measured: about 1.25x)."""
    timm_model = make_timm_model("h_optimus_0", depth=6)
    path = save_hub_files(timm_model, tmp_path)["safetensors"]
    (tmp_path / "pytorch_model.bin").unlink()
    x = random_input(42, 56)
    with torch.no_grad():
        ref = timm_model.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                               indices=[-1], intermediates_only=True)[0]
    np.save(tmp_path / "ref.npy", ref.permute(0, 2, 3, 1).numpy())
    np.save(tmp_path / "x.npy", x)
    del timm_model
    script = textwrap.dedent(f"""
        import dataclasses, json, sys
        sys.modules["torch"] = None  # any import of torch now fails
        import numpy as np
        from fseg_jax.convert.checkpoint import convert_checkpoint
        from fseg_jax.models.config import ViTConfig
        config = dataclasses.replace(ViTConfig.from_preset("h_optimus_0"), depth=6)
        def status(field):  # bytes; VmHWM (peak) belongs to this process image, unlike ru_maxrss after exec
            with open("/proc/self/status") as f:
                line = next(line for line in f if line.startswith(field + ":"))
            return int(line.split()[1]) * 1024
        import jax, flax.nnx
        jax.numpy.zeros(1).block_until_ready()  # imports and backend initialised before the baseline
        before = status("VmRSS")
        model = convert_checkpoint({str(path)!r}, config)
        peak = status("VmHWM")
        out = model.forward_intermediates(np.load({str(tmp_path / 'x.npy')!r}), indices=[-1])[0]
        print(json.dumps({{"added": peak - before, "out": np.asarray(out).tolist()}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    weights = path.stat().st_size
    assert report["added"] <= 2.0 * weights, f"added {report['added'] / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
    assert relative_error(np.asarray(report["out"]), np.load(tmp_path / "ref.npy")) <= 1e-4
