"""Reference transformers models for tests: ``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel`` of the
released architectures with random, fully perturbed weights, saved the way the hub ships them.

Importable from any test: ``from hf_models import make_hf_model``. The architectures come from the weights
manifests (``weights/<preset>.json``, key ``transformers``): the same ``config.json`` the hub ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from timm_models import randomize

from fseg_jax.models.weights import read_manifest


def make_hf_model(hf_config: dict, depth: int | None = None, *, seed: int = 0):
    """The transformers model of a ``config.json`` dict (depth reduced when given), eval mode, float32.

    Every parameter is randomised (``timm_models.randomize``) and every LayerScale ``lambda1`` drawn from
    U(0.1, 1) (transformers initialises it to ``layerscale_value``, 1.0 for DINOv2).
    """
    from transformers import AutoConfig, AutoModel

    hf_config = dict(hf_config)
    if depth is not None:
        hf_config["num_hidden_layers"] = depth
    config = AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    kwargs = {"add_pooling_layer": True} if config.model_type == "vit" else {}
    model = AutoModel.from_config(config, **kwargs)
    randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.9 + 0.1)
    return model.eval()


def make_hf_preset(preset: str, depth: int | None = None, *, seed: int = 0):
    """``make_hf_model`` of a preset's manifest ``transformers`` config."""
    return make_hf_model(read_manifest(preset)["transformers"], depth, seed=seed)


def save_hf_folder(model, directory: Path) -> Path:
    """``save_pretrained``: ``config.json`` + ``model.safetensors``, the files a transformers hub repo ships."""
    directory = Path(directory)
    model.save_pretrained(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    return directory


def hf_hidden_states(model, x_bhwc: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """transformers' ``hidden_states`` as channels-last patch grids (index 0 = the embeddings, i + 1 = the
    output of layer i) and ``last_hidden_state`` (after the final LayerNorm) as a grid; the class token and
    any register tokens are dropped."""
    b, h, w, _ = x_bhwc.shape
    p = model.config.patch_size
    n_prefix = 1 + getattr(model.config, "num_register_tokens", 0)
    x = torch.from_numpy(np.ascontiguousarray(x_bhwc.transpose(0, 3, 1, 2)))
    kwargs = {"interpolate_pos_encoding": True} if model.config.model_type == "vit" else {}
    with torch.no_grad():
        out = model(x, output_hidden_states=True, **kwargs)

    def grid(tokens):
        return tokens[:, n_prefix:].numpy().reshape(b, h // p, w // p, -1)

    return [grid(s) for s in out.hidden_states], grid(out.last_hidden_state)
