"""Reference timm models for tests: the released architectures with random, fully perturbed weights.

Importable from any test (pytest puts tests/ on sys.path): ``from timm_models import make_timm_model``.

The timm arguments come from the weights manifests (``weights/<preset>.json``), the same source the
library documents, so a test exercises the real architecture of each released checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from fseg_jax.models.config import ViTConfig
from fseg_jax.models.weights import read_manifest


def timm_arguments(preset: str) -> tuple[str, dict]:
    """(timm architecture, create_model kwargs) of a preset, with layer names resolved to classes."""
    import timm.layers

    spec = read_manifest(preset)["timm"]
    kwargs = dict(spec["model_args"])
    for key in ("mlp_layer", "act_layer"):
        if key in kwargs:
            kwargs[key] = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU,
                           "GELU": torch.nn.GELU}[kwargs[key]]
    return spec["architecture"], kwargs


def randomize(model: torch.nn.Module, seed: int = 0, gamma_range: tuple[float, float] = (0.1, 1.0)) -> None:
    """Give every parameter a visible random value, in place.

    timm's init leaves LayerNorm weights at 1, biases at 0, the class token near 0 and LayerScale at 1e-5,
    where a swapped or skipped tensor would go unnoticed. LayerScale gammas become U(gamma_range), norm
    weights 1 + N(0, 0.1), everything else N(0, 0.02); batch-norm statistics are randomised as well.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                lo, hi = gamma_range
                p.copy_(torch.rand(p.shape, generator=gen) * (hi - lo) + lo)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def make_timm_model(preset: str, depth: int | None = None, *, seed: int = 0, perturb: bool = True):
    """The timm model of ``preset`` (depth reduced when given, full width), in eval mode, float32.

    ``dynamic_img_size=True`` (any H, W multiple of the patch) and no classifier head, as F-Seg uses it.
    With ``perturb`` every parameter is randomised (``randomize``), LayerScale gammas in [0.1, 1].
    """
    import timm

    architecture, kwargs = timm_arguments(preset)
    if depth is not None:
        kwargs["depth"] = depth
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    if perturb:
        randomize(model, seed)
    return model.eval()


def make_torchvision_resnet50(*, seed: int = 0, perturb: bool = True):
    """torchvision's ResNet-50 with random weights (batch-norm statistics randomised too), eval mode."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None)
    if perturb:
        randomize(model, seed)
    return model.eval()


def fseg_config(preset: str, depth: int | None = None) -> ViTConfig:
    """The fseg_jax config matching ``make_timm_model(preset, depth)``."""
    config = ViTConfig.from_preset(preset)
    return config if depth is None else dataclasses.replace(config, depth=depth)


def save_hub_files(model: torch.nn.Module, directory: Path) -> dict[str, Path]:
    """Write the state dict the way the hub ships it: ``pytorch_model.bin`` (torch.save) and
    ``model.safetensors``. Returns {"bin": path, "safetensors": path}."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    paths = {"bin": directory / "pytorch_model.bin", "safetensors": directory / "model.safetensors"}
    torch.save(state, paths["bin"])
    save_file(state, str(paths["safetensors"]))
    return paths


def random_input(height: int, width: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A normalised-looking (B, H, W, 3) float32 image batch."""
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3), dtype=np.float32)


def timm_intermediates(model, x_bhwc: np.ndarray, indices=None) -> tuple[list[np.ndarray], np.ndarray]:
    """timm's ``forward_intermediates`` as channels-last numpy: (block grids, final-norm grid)."""
    x = torch.from_numpy(np.ascontiguousarray(x_bhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        final, grids = model.forward_intermediates(x, indices=indices, output_fmt="NCHW")
    grids = [g.permute(0, 2, 3, 1).numpy() for g in grids]
    final = final[:, model.num_prefix_tokens:].numpy().reshape(grids[-1].shape)
    return grids, final


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
