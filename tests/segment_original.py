"""The original F-Seg pipeline (segf 1.0.4, ``fseg/fseg.py``) rebuilt from timm, torch and scikit-learn.

Used by the segmentation fidelity tests and ``bench/segment.py`` as the reference. It performs the same
operations in the same order as the original: a forward hook on the last requested block (before the final
norm), the class token dropped, ReLU, a (B, D, h, w) activation tensor; the image padded bottom/right by edge
replication to a multiple of 16, scaled to [0, 1] and normalised with ImageNet mean/std; scikit-learn's
``non_negative_factorization(update_H=False, max_iter=10000, random_state=0)`` for the projection and
``NMF(init="random", random_state=0)`` on the (D, tokens) matrix for the per-image factorisation; torch's
bilinear ``interpolate`` to the padded size and an argmax. Two deliberate departures, both documented where
they occur: the nearest-concept mode interpolates similarities rather than label ids (the original's
``predict_clustering_without_factorization`` reduces with a flat ``argmin`` and cannot run), and the label map
is cropped back to the input size.
"""

from __future__ import annotations

import time

import numpy as np
import torch

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def input_tensor(image_hw3_uint8: np.ndarray, patch: int = 16) -> torch.Tensor:
    """Edge-pad bottom/right to a multiple of ``patch``, scale to [0, 1], normalise: (1, 3, H', W')."""
    h, w = image_hw3_uint8.shape[:2]
    hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
    padded = np.pad(image_hw3_uint8, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    x = (padded.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


class OriginalFSeg:
    """Activations from a hook on ``model.blocks[block]`` as in the original, plus its prediction modes."""

    def __init__(self, timm_model, block: int = -1):
        self.model = timm_model
        self._out = None
        timm_model.blocks[block].register_forward_hook(self._hook)
        self.timings: dict[str, float] = {}

    def _hook(self, module, inputs, output):
        self._out = output

    def activations(self, x: torch.Tensor) -> np.ndarray:
        """(B, D, h, w) float32: ReLU of the hooked block's tokens after the one class token."""
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model(x)
        tokens = self._out
        h, w = x.shape[2] // 16, x.shape[3] // 16
        grid = tokens[:, 1:, :].reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)
        acts = torch.nn.ReLU()(grid).numpy()
        self.timings["forward"] = time.perf_counter() - t0
        return acts

    @staticmethod
    def _upsample_argmax(w_bkhw: np.ndarray, size) -> np.ndarray:
        resized = torch.nn.functional.interpolate(torch.from_numpy(w_bkhw), size, mode="bilinear")
        return resized[0].numpy().transpose((1, 2, 0)).argmax(axis=-1)

    def project(self, x: torch.Tensor, concepts: np.ndarray, tol: float = 1e-4) -> np.ndarray:
        """``predict_project_concepts``: NNLS of every token on the bank, bilinear upsampling, argmax.

        ``tol`` is scikit-learn's stopping tolerance (the original leaves it at its default, 1e-4)."""
        from sklearn.decomposition import non_negative_factorization

        concepts = np.maximum(concepts, 0)  # the original clips the caller's array in place
        acts = self.activations(x).transpose((0, 2, 3, 1))
        t0 = time.perf_counter()
        vector = acts.reshape(-1, acts.shape[-1])
        w, _, _ = non_negative_factorization(
            X=vector, H=concepts, W=None, n_components=len(concepts), update_H=False, random_state=0,
            max_iter=10000, tol=tol,
        )
        self.timings["nnls"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        w = w.reshape((acts.shape[1], acts.shape[2], -1)).astype(np.float32)
        labels = self._upsample_argmax(w.transpose((2, 0, 1))[None], (x.shape[2], x.shape[3]))
        self.timings["upsample_argmax"] = time.perf_counter() - t0
        return labels

    def nearest(self, x: torch.Tensor, concepts: np.ndarray) -> np.ndarray:
        """Per-token cosine similarity to the bank, upsampled bilinearly, argmax (similarities, not ids)."""
        from sklearn.metrics.pairwise import cosine_distances

        acts = self.activations(x)[0].transpose((1, 2, 0))
        sim = 1.0 - cosine_distances(acts.reshape(-1, acts.shape[-1]), concepts)
        sim = sim.reshape(acts.shape[0], acts.shape[1], -1).astype(np.float32)
        return self._upsample_argmax(sim.transpose((2, 0, 1))[None], (x.shape[2], x.shape[3]))

    def factorize(self, x: torch.Tensor, concepts: np.ndarray, n_components: int = 20):
        """``predict_clustering``: NMF of the (D, tokens) matrix, components mapped to the nearest concept
        by cosine distance, component weights upsampled, argmax, mapped. Returns (labels, mapping, components):
        the components as (n_components, D) rows."""
        from sklearn.decomposition import NMF
        from sklearn.metrics.pairwise import cosine_distances

        acts = self.activations(x)
        b, d, h, w = acts.shape
        mat = acts.transpose((1, 0, 2, 3)).reshape(d, -1)
        model = NMF(n_components=n_components, init="random", random_state=0)
        comp_dk = model.fit_transform(mat)
        weights = model.components_.reshape(n_components, b, h, w).transpose((1, 0, 2, 3))
        mapping = np.array([cosine_distances(c[None], concepts).argmin() for c in comp_dk.T])
        labels = self._upsample_argmax(weights.astype(np.float32), (x.shape[2], x.shape[3]))
        return mapping[labels], mapping, comp_dk.T


def segment_original(fseg: OriginalFSeg, image_hw3_uint8: np.ndarray, concepts: np.ndarray, method: str, **kw):
    """Labels (H, W) of the original pipeline for one image, cropped back to the image size."""
    x = input_tensor(image_hw3_uint8)
    h, w = image_hw3_uint8.shape[:2]
    if method == "project":
        labels = fseg.project(x, concepts, **kw)
    elif method == "nearest":
        labels = fseg.nearest(x, concepts)
    elif method == "factorize":
        labels = fseg.factorize(x, concepts, **kw)[0]
    else:
        raise ValueError(method)
    return labels[:h, :w]
