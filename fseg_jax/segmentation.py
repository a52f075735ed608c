"""Segment H&E images into concepts: every F-Seg mode, batched and jitted end to end.

The pipeline for a batch of images of one padded size is a single jitted program: normalise, run the model
to the requested block, ReLU, solve for the token weights (vmapped over images, each with its own stopping
rule), upsample the weights bilinearly to the padded image size and take the argmax, one concept at a time so that
no ``(H, W, k)`` float array is ever held. Images are grouped by padded size on the host,
so a folder of varied sizes compiles once per distinct size (or once per ``bucket`` with a coarser bucket).

Methods (labels are concept indices into the bank's ``k`` concepts, except for ``"dff"``):

- ``"project"``: non-negative least squares of every token onto the concepts (the original
  ``predict_project_concepts``), weights upsampled, argmax. The default solver of ``fseg_jax.nmf`` reaches
  the least-squares optimum more closely than the original's scikit-learn coordinate descent, which stops
  at a relative tolerance of 1e-4; on badly conditioned banks (near-duplicate concepts) that early stop
  decides a few percent of labels, and ``solver="hals"`` reproduces the original's iterates and labels.
- ``"nearest"``: cosine similarity of every token to every concept, upsampled, argmax. At token centres this is
  the nearest concept by cosine distance; between them the similarities (not the label ids, as in the
  original ``predict_clustering_without_factorization``) are interpolated.
- ``"factorize"``: per-image NMF with ``n_components`` free components (20 in the original
  ``predict_clustering``), each component mapped to its nearest concept by cosine distance; the component
  weights are upsampled, argmaxed, then mapped to concepts.
- ``"dff"``: per-image NMF with ``k`` free components and no bank ("deep feature factorization"): labels are
  component indices, and the components are returned too.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fseg_jax import nmf as _nmf
from fseg_jax.features import _layer_list, padded_size, preprocess, token_features
from fseg_jax.io.images import collect_images
from fseg_jax.models import with_compute_dtype
from fseg_jax.upsample import upsample, upsample_argmax  # noqa: F401 - upsample is re-exported here

METHODS = ("project", "nearest", "factorize", "dff")


class SegmentResult(NamedTuple):
    """What :func:`segment` returns with ``return_weights=True`` or for ``method="dff"``.

    Attributes:
        labels: int32 label maps, (H, W) for one image, (B, H, W) for a batch, or a list for a list input.
        weights: token-level weights, (h, w, m) float32 per image (batched like ``labels``): NNLS weights for
            ``"project"``, cosine similarities for ``"nearest"``, NMF component weights for ``"factorize"`` and
            ``"dff"`` (m = number of components). h, w: the padded image size divided by the patch size.
        components: ``"factorize"`` / ``"dff"`` only: the NMF components, (m, d) float32 per image; else None.
        component_concepts: ``"factorize"`` only: the concept index each component maps to, (m,) int32 per
            image; else None.
    """

    labels: Any
    weights: Any
    components: Any = None
    component_concepts: Any = None


def segment(
    images,
    concepts=None,
    *,
    model,
    k: int | None = None,
    method: str = "project",
    layer: int | Sequence[int] = -1,
    return_weights: bool = False,
    n_components: int = 20,
    seed: int = 0,
    batch_size: int = 4,
    bucket: int | None = None,
    dtype=None,
    solver: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
):
    """Segment one image or many into concepts.

    Args:
        images: one image or several. One image: an (H, W, 3) array (uint8 0..255, uint16, or float in
            [0, 1]), a PIL image or a file path; a batch: a (B, H, W, 3) array; or a list of those (sizes may
            differ). Grayscale is replicated to RGB, RGBA is composited over white (see ``fseg_jax.io``).
            Images smaller than a patch (down to 1x1) are padded by edge replication to one patch.
            Inputs are never modified.
        concepts: a ``ConceptBank`` (then ``k`` picks one of its banks), a (k, d) array of concepts, or a path /
            preset name understood by ``fseg_jax.concepts.resolve_concepts``. Not used by ``"dff"``.
            Negative entries (rounding noise in published banks) are clipped to 0 in a copy.
        model: a model with ``config`` and ``forward_intermediates`` (``VisionTransformer``, ``ResNet50``).
        k: the bank size to use from a ``ConceptBank``; for ``"dff"`` the number of NMF components.
        method: ``"project"``, ``"nearest"``, ``"factorize"`` or ``"dff"`` (see the module docs).
        layer: block whose output is used (negative counts from the end); a list concatenates several blocks.
        return_weights: also return the token-level weights (a :class:`SegmentResult`).
        n_components: free NMF components for ``"factorize"`` (the original uses 20).
        seed: seed of the NMF's random initialisation (``"factorize"``, ``"dff"``); the same for every image.
        batch_size: images per compiled call (batches are padded to a power of two up to this).
        bucket: pad images to a multiple of this many pixels (a multiple of the patch size) instead of the
            patch size, so images of nearby sizes share one compilation. The model then sees more edge
            padding, which changes its features slightly; None (default) pads to the patch size, as the
            original does.
        dtype: compute dtype of the model's forward pass, e.g. ``jnp.bfloat16`` on GPU/TPU (parameters stay
            float32; the NMF and everything after the model run in float32). None: the model's own (float32).
        solver, tol, max_iter: passed to the NMF core (``fseg_jax.nmf``) when given; its defaults otherwise.

    Returns:
        int32 labels: (H, W) for one image, (B, H, W) for a batch array, a list of (H, W) for a list input.
        A :class:`SegmentResult` instead when ``return_weights`` is true or ``method`` is ``"dff"``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options, concepts_kd = _prepare(
        model, concepts, k=k, method=method, layer=layer, n_components=n_components, seed=seed,
        solver=solver, tol=tol, max_iter=max_iter,
    )
    images_list, kind = collect_images(images)
    if dtype is not None:
        model = with_compute_dtype(model, jnp.dtype(dtype))
    config = model.config
    graphdef, state = nnx.split(model)
    concepts_j = jnp.asarray(concepts_kd)

    # group by padded size and dtype: one compiled program per group shape
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images_list):
        hp, wp = padded_size(im.shape[0], im.shape[1], config.patch_size, bucket)
        groups.setdefault((hp, wp, im.dtype.str), []).append(i)

    outputs: list[Any] = [None] * len(images_list)
    for (hp, wp, _), members in groups.items():
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            padded_b = _next_pow2(len(idx), batch_size)
            batch = np.stack([_pad_edge(images_list[i], hp, wp) for i in idx])
            if padded_b > len(idx):
                batch = np.concatenate([batch, np.repeat(batch[-1:], padded_b - len(idx), axis=0)])
            out = jax.device_get(_run(graphdef, options, state, concepts_j, jnp.asarray(batch)))
            for j, i in enumerate(idx):
                h, w = images_list[i].shape[:2]
                labels_j, weights_j, components_j, mapping_j = (None if o is None else o[j] for o in out)
                outputs[i] = (labels_j[:h, :w], weights_j, components_j, mapping_j)

    labels = [o[0] for o in outputs]
    if kind == "single":
        pack = lambda items: items[0]  # noqa: E731
    elif kind == "batch":
        pack = np.stack
    else:
        pack = list
    if not return_weights and method != "dff":
        return pack(labels)
    weights = pack([o[1] for o in outputs])
    components = pack([o[2] for o in outputs]) if method in ("factorize", "dff") else None
    mapping = pack([o[3] for o in outputs]) if method == "factorize" else None
    return SegmentResult(pack(labels), weights, components, mapping)


def make_token_fn(
    model,
    concepts_kd,
    *,
    k: int | None = None,
    method: str = "project",
    layer: int | Sequence[int] = -1,
    dtype=None,
    n_components: int = 20,
    seed: int = 0,
    solver: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
):
    """A pure function from images to token-level concept weights, for callers that jit and shard it.

    Returns ``(fn, params)`` with ``fn(params, images_bhw3) -> (B, h, w, k)`` float32: images are uint8 (or float
    0..1) with H and W multiples of the patch size (no padding is done here), h = H/p, w = W/p, and higher
    values mean more of that concept: NNLS weights (``"project"``), cosine similarities (``"nearest"``), or for
    ``"factorize"`` the largest weight among the NMF components mapped to each concept (0 for concepts no
    component maps to), so the argmax over concepts is the original's label at every token.

    ``concepts_kd`` and ``k`` are as ``concepts`` and ``k`` of :func:`segment` (a (k, d) array, or a bank and
    the k to use from it); for ``"dff"`` ``concepts_kd`` may be None and ``k`` is the number of components.
    ``params`` holds the model state and the concepts; ``dtype`` (e.g. ``jnp.bfloat16``) runs the forward pass
    in that compute dtype (parameters stay float32).
    """
    options, concepts = _prepare(
        model, concepts_kd, k=k, method=method, layer=layer, n_components=n_components, seed=seed,
        solver=solver, tol=tol, max_iter=max_iter,
    )
    if dtype is not None:
        model = with_compute_dtype(model, jnp.dtype(dtype))
    graphdef, state = nnx.split(model)
    config = model.config

    def fn(params, images_bhw3):
        x = preprocess(images_bhw3, config, size=tuple(images_bhw3.shape[1:3]))
        model_ = nnx.merge(graphdef, params["model"])
        feats = token_features(model_, x, list(options.layers))
        return jax.vmap(lambda f: _token_scores(f, params["concepts"], options))(feats)

    return fn, {"model": state, "concepts": jnp.asarray(concepts)}


# --- the jitted program ---------------------------------------------------------------------------------------


class _Options(NamedTuple):
    method: str
    layers: tuple[int, ...]
    n_components: int
    seed: int
    solver_kwargs: tuple[tuple[str, Any], ...]


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def _run(graphdef, options: _Options, state, concepts_kd, images_bhw3):
    """Padded images (B, Hp, Wp, 3) -> labels (B, Hp, Wp) int32, token weights, components, component map."""
    model = nnx.merge(graphdef, state)
    _, hp, wp, _ = images_bhw3.shape
    x = preprocess(images_bhw3, model.config, size=(hp, wp))
    feats = token_features(model, x, list(options.layers))
    _, h, w, _ = feats.shape

    def one(feats_hwd):
        weights_hwm, components_md, mapping_m = _token_weights(feats_hwd, concepts_kd, options)
        labels = upsample_argmax(weights_hwm, (hp, wp))
        if mapping_m is not None:
            labels = mapping_m[labels]
        return labels, weights_hwm, components_md, mapping_m

    return jax.vmap(one)(feats)


def _token_weights(feats_hwd, concepts_kd, options: _Options):
    """Per image: (h, w, m) weights, plus the NMF components (m, d) and component -> concept map (m,)."""
    h, w, d = feats_hwd.shape
    x_nd = feats_hwd.reshape(h * w, d)
    kwargs = dict(options.solver_kwargs)
    if options.method == "project":
        res = _nmf.nnls(x_nd, concepts_kd, **kwargs)
        return res.w.reshape(h, w, -1), None, None
    if options.method == "nearest":
        sim = _unit_rows(x_nd) @ _unit_rows(concepts_kd).T
        return sim.reshape(h, w, -1), None, None
    # "factorize" / "dff": the original factorises the (d, n) matrix (channels x tokens) with scikit-learn's
    # NMF(init="random", random_state=seed); the same matrix, the same starting point and the same
    # coordinate-descent sweeps ("hals") reproduce its factors.
    x_dn = x_nd.T
    normal_h, normal_w = _sklearn_random_normals(options.seed, options.n_components, d, h * w)
    avg = jnp.sqrt(jnp.mean(x_dn) / options.n_components)
    res = _nmf.nmf_from(x_dn, avg * jnp.abs(normal_w), avg * jnp.abs(normal_h), **kwargs)
    components_md = res.w.T
    weights_nm = res.h.T
    mapping = None
    if options.method == "factorize":
        mapping = jnp.argmax(_unit_rows(components_md) @ _unit_rows(concepts_kd).T, axis=-1).astype(jnp.int32)
    return weights_nm.reshape(h, w, -1), components_md, mapping


@functools.lru_cache(maxsize=16)
def _sklearn_random_normals(seed: int, k: int, n_samples: int, n_features: int):
    """The standard normals scikit-learn's ``init="random"`` draws for a (n_samples, n_features) matrix:
    H (k, n_features) first, then W (n_samples, k), from ``RandomState(seed)``."""
    rng = np.random.RandomState(seed)
    normal_h = rng.standard_normal(size=(k, n_features)).astype(np.float32)
    normal_w = rng.standard_normal(size=(n_samples, k)).astype(np.float32)
    return normal_h, normal_w


def _token_scores(feats_hwd, concepts_kd, options: _Options):
    weights, _, mapping = _token_weights(feats_hwd, concepts_kd, options)
    if mapping is None:
        return weights
    # per concept: the largest weight among the components mapped to it
    onehot = mapping[:, None] == jnp.arange(concepts_kd.shape[0])[None, :]
    return jnp.max(jnp.where(onehot[None, None], weights[..., :, None], 0.0), axis=-2)


def _unit_rows(a):
    """Rows scaled to unit L2 norm; all-zero rows stay zero (as scikit-learn's ``normalize`` does)."""
    norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
    return a / jnp.where(norm > 0, norm, 1.0)


# --- host-side helpers -------------------------------------------------------------------------------------------


def _prepare(model, concepts, *, k, method, layer, n_components, seed, solver, tol, max_iter):
    """Check the arguments :func:`segment` and :func:`make_token_fn` share.

    Returns the program's static options and the (m, d) float32 concepts it takes: the bank's concepts, or for
    ``"dff"`` (which has none) zeros that fix m = ``k``, the number of components.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    layers = tuple(_layer_list(layer, model))
    feature_dim = int(model.config.embed_dim) * len(layers)
    if method == "dff":
        if k is None or int(k) < 1:
            raise ValueError("method 'dff' needs k >= 1, the number of NMF components: pass k=")
        concepts_kd = np.zeros((int(k), feature_dim), np.float32)
        n_components = int(k)
    else:
        concepts_kd = _concepts_array(concepts, k, feature_dim, model, layers)
        n_components = int(n_components)
        if method == "factorize" and n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
    options = _Options(
        method=method,
        layers=layers,
        n_components=n_components,
        seed=int(seed),
        solver_kwargs=_solver_kwargs(solver, tol, max_iter),
    )
    return options, concepts_kd


def _concepts_array(concepts, k, feature_dim: int, model, layers) -> np.ndarray:
    """The (k, d) float32 concept matrix (negatives clipped to 0, in a copy), checked against the model."""
    if concepts is None:
        raise ValueError("this method needs concepts: pass a ConceptBank, a (k, d) array, or a bank path or preset")
    if isinstance(concepts, (str, os.PathLike)) or hasattr(concepts, "ks"):  # a path, preset or ConceptBank
        from fseg_jax.concepts import check_compatible, resolve_concepts

        bank = resolve_concepts(concepts)
        layer = layers[0] if len(layers) == 1 else layers
        check_compatible(bank, feature_dim, model_name=getattr(model.config, "name", None), layer=layer)
        if k is None:
            if len(bank.ks) != 1:
                raise ValueError(f"the concept bank holds k in {list(bank.ks)}: pass k= to choose one")
            k = bank.ks[0]
        arr = bank[int(k)]
    else:
        arr = concepts
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"concepts must be a (k, d) array, got shape {arr.shape}")
    if k is not None and arr.shape[0] != int(k):
        raise ValueError(f"k={k} but the concepts array holds {arr.shape[0]} concepts; leave k unset for an array")
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"concepts must be floating point, got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("concepts contain NaN or infinite values; use a bank of finite values")
    if arr.shape[1] != feature_dim:
        name = getattr(model.config, "name", type(model).__name__)
        raise ValueError(
            f"concept dimension {arr.shape[1]} does not match the model's feature dimension {feature_dim} "
            f"(model {name!r}); use a bank built for this model and layer"
        )
    return np.maximum(arr, 0).astype(np.float32)


def _solver_kwargs(solver, tol, max_iter) -> tuple[tuple[str, Any], ...]:
    given = {"solver": solver, "tol": tol, "max_iter": max_iter}
    return tuple(sorted((name, value) for name, value in given.items() if value is not None))


def _next_pow2(n: int, cap: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return min(p, cap)


def _pad_edge(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    return np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
