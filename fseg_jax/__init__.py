"""fseg_jax: unsupervised segmentation of H&E images by factorising foundation-model features (F-Seg).

The public names below are imported lazily, so `import fseg_jax` stays cheap and the command line starts
fast; each is importable from its own module as well.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # models and weights
    "ViTConfig": "fseg_jax.models.config",
    "VisionTransformer": "fseg_jax.models.vit",
    "ResNet50": "fseg_jax.models.resnet",
    "convert_timm_state_dict": "fseg_jax.convert.timm",
    "convert_hf_state_dict": "fseg_jax.convert.hf",
    "load_model": "fseg_jax.hub",
    "save_model": "fseg_jax.hub",
    # NMF core: checked, batched front ends and their pure, traceable twins
    "project": "fseg_jax.factorization",
    "factorize": "fseg_jax.factorization",
    "nnls": "fseg_jax.factorization",
    "nmf": "fseg_jax.factorization",
    "nmf_from": "fseg_jax.factorization",
    # segmentation
    "segment": "fseg_jax.segmentation",
    "Pipeline": "fseg_jax.segmentation",
    "SegmentResult": "fseg_jax.segmentation",
    "make_token_fn": "fseg_jax.segmentation",
    "ConceptBank": "fseg_jax.concepts",
    "load_concepts": "fseg_jax.concepts",
    "save_concepts": "fseg_jax.concepts",
    "import_joblib_concepts": "fseg_jax.concepts",
    "build_concepts": "fseg_jax.concepts",
    "overlay": "fseg_jax.visualize",
    # evaluation against annotations
    "evaluate": "fseg_jax.evaluation",
    "EvaluationResult": "fseg_jax.evaluation",
    "concept_atlas": "fseg_jax.atlas",
    "learn_concepts": "fseg_jax.learning",
    # whole slides
    "segment_slide": "fseg_jax.wsi.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fseg_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from fseg_jax.concepts import ConceptBank, build_concepts, import_joblib_concepts, load_concepts, save_concepts
    from fseg_jax.convert.hf import convert_hf_state_dict
    from fseg_jax.convert.timm import convert_timm_state_dict
    from fseg_jax.hub import load_model, save_model
    from fseg_jax.models.config import ViTConfig
    from fseg_jax.models.resnet import ResNet50
    from fseg_jax.models.vit import VisionTransformer
    from fseg_jax.factorization import factorize, nmf, nmf_from, nnls, project
    from fseg_jax.segmentation import Pipeline, SegmentResult, make_token_fn, segment
    from fseg_jax.atlas import concept_atlas
    from fseg_jax.evaluation import EvaluationResult, evaluate
    from fseg_jax.learning import learn_concepts
    from fseg_jax.visualize import overlay
    from fseg_jax.wsi.pipeline import segment_slide
