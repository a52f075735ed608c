"""Segment H&E images into concepts: every F-Seg mode, batched and jitted end to end.

The pipeline for a batch of images of one padded size is a single jitted program: normalise, run the model
to the requested block, ReLU, solve for the token weights (vmapped over images, each with its own stopping
rule), upsample the weights bilinearly to the padded image size and take the argmax, one concept at a time so that
no ``(H, W, k)`` float array is ever held. Images are grouped by padded size on the host,
so a folder of varied sizes compiles once per distinct size (or once per ``bucket`` with a coarser bucket).

Every front end (:func:`segment`, :func:`make_token_fn`, ``fseg-jax segment``, the slide pipeline through
``Pipeline.create(...).token_fn()``) describes its run as one frozen :class:`Pipeline`, built and checked once
by ``Pipeline.create``; the jitted program itself is the public, pure :func:`segment_padded`.

Methods (labels are concept indices into the bank's ``k`` concepts, except for ``"dff"``):

- ``"project"``: non-negative least squares of every token onto the concepts (the original
  ``predict_project_concepts``), weights upsampled, argmax. The default solver of ``fseg_jax.factorization`` reaches
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

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, Shaped

from fseg_jax import factorization
from fseg_jax.compilation import jit
from fseg_jax.concepts.names import ConceptClasses, check_classes
from fseg_jax.features import layer_list, padded_size, preprocess, token_features
from fseg_jax.io.images import collect_images
from fseg_jax.methods import METHODS
from fseg_jax.models import with_compute_dtype
from fseg_jax.upsample import upsample_argmax

_MODEL_HELP = "pass model= (a model, a preset name such as 'uni', or a converted model directory)"


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


class ProgramOptions(NamedTuple):
    """The static (hashable) options of the jitted programs :func:`segment_padded` and :func:`token_weights`.

    method: one of ``METHODS``; layers: the blocks whose features are concatenated; n_components: NMF
    components (``"factorize"``; for ``"dff"`` the bank size k); seed: NMF start
    (``fseg_jax.factorization.random_init``);
    solver_kwargs: sorted ``(name, value)`` pairs of ``solver`` / ``tol`` / ``max_iter`` for the NMF core.
    """

    method: str
    layers: tuple[int, ...]
    n_components: int
    seed: int
    solver_kwargs: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """One segmentation, described once and checked once: what :func:`segment`, :func:`make_token_fn`,
    ``fseg-jax segment`` and the slide pipeline run.

    Build it with :meth:`create`, which takes the user-facing arguments (model and bank as objects, names or
    paths); the constructor takes resolved values and checks them. Then :meth:`segment` labels images and
    :meth:`token_fn` gives the pure per-tile function.

    Attributes:
        model: the model (``VisionTransformer``, ``ResNet50``), float32 parameters.
        concepts: (k, d) float32 concepts, read-only, negatives clipped; None for ``"dff"``. d is the model's
            width times the number of layers.
        k: the number of concepts, None for all rows of ``concepts`` (for ``"dff"``: NMF components, required).
        method: ``"project"``, ``"nearest"``, ``"factorize"`` or ``"dff"`` (see the module docs).
        layers: block indices whose features are concatenated.
        n_components: free NMF components of ``"factorize"``.
        seed: seed of the NMF start (``"factorize"``, ``"dff"``), the same for every image.
        solver, tol, max_iter: NMF core options (``fseg_jax.factorization``); None takes its defaults.
        dtype: compute dtype of the forward pass (e.g. bfloat16), None for the model's own (float32).
        bucket: pad images to a multiple of this many pixels (None: of the patch size).
        batch_size: images per compiled call.
        classes: the bank's classes for k (``ConceptBank.classes``: its concepts grouped by name), or None when
            the bank names none of them (or the concepts came as an array); ``segment(classes=True)`` maps the
            labels through them.
    """

    model: Any
    concepts: np.ndarray | None
    k: int | None = None
    method: str = "project"
    layers: tuple[int, ...] = (-1,)
    n_components: int = 20
    seed: int = 0
    solver: str | None = None
    tol: float | None = None
    max_iter: int | None = None
    dtype: Any = None
    bucket: int | None = None
    batch_size: int = 4
    classes: ConceptClasses | None = None

    def __post_init__(self):
        _check_method(self.method, self.k, self.concepts)
        if self.classes is not None and self.method == "dff":
            raise ValueError("method 'dff' labels NMF components, which have no names: leave classes unset")
        object.__setattr__(self, "layers", tuple(layer_list(list(self.layers), self.model)))
        _check_int("n_components", self.n_components)
        _check_int("batch_size", self.batch_size)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        padded_size(1, 1, self.model.config.patch_size, self.bucket)  # checks the bucket
        choices = factorization.SOLVERS if self.method == "project" else factorization.NMF_SOLVERS
        if self.solver is not None and (self.method == "nearest" or self.solver not in choices):
            allowed = "none" if self.method == "nearest" else ", ".join(choices)
            raise ValueError(f"solver {self.solver!r} does not apply to method {self.method!r} (solvers: {allowed})")
        if self.tol is not None and (
            isinstance(self.tol, bool)
            or not isinstance(self.tol, (int, float, np.floating))
            or not (math.isfinite(self.tol) and self.tol >= 0)
        ):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if self.max_iter is not None:
            _check_int("max_iter", self.max_iter)
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.method == "dff":
            object.__setattr__(self, "k", int(self.k))
            object.__setattr__(self, "concepts", None)
            return
        arr = np.asarray(self.concepts)
        if arr.ndim == 2 and arr.shape[1] != self.feature_dim:
            name = getattr(self.model.config, "name", type(self.model).__name__)
            raise ValueError(
                f"concept dimension {arr.shape[1]} does not match the model's feature dimension {self.feature_dim} "
                f"(model {name!r}); use a bank built for this model and layer"
            )
        if self.k is None and arr.ndim == 2:
            object.__setattr__(self, "k", int(arr.shape[0]))
        elif arr.ndim == 2 and arr.shape[0] != self.k:
            raise ValueError(f"k={self.k} but the concepts array holds {arr.shape[0]} concepts; leave k unset for an array")
        checked = np.asarray(factorization.check_concepts(arr, self.feature_dim), np.float32)
        checked.setflags(write=False)
        object.__setattr__(self, "concepts", checked)
        object.__setattr__(self, "k", int(self.k))
        check_classes(self.classes, self.k)

    @classmethod
    def create(
        cls,
        concepts=None,
        *,
        model=None,
        k: int | None = None,
        method: str = "project",
        layer: int | Sequence[int] = -1,
        n_components: int = 20,
        seed: int = 0,
        solver: str | None = None,
        tol: float | None = None,
        max_iter: int | None = None,
        dtype=None,
        bucket: int | None = None,
        batch_size: int = 4,
    ) -> Pipeline:
        """Resolve and check the arguments of :func:`segment` (see there) into a pipeline.

        ``model`` may be a model, a preset name or a converted model directory (loaded once per process and
        kept: ``fseg_jax.hub.resolve_model``); None takes the model the concept bank records. A bank given by
        path, preset or ``ConceptBank`` is checked against the model (width, and a warning when it was made for
        another model or layer); ``k`` picks one of its matrices, and the bank's names for that k, if any,
        become the pipeline's ``classes``.
        """
        from fseg_jax.hub import model_source, resolve_model

        _check_method(method, k, concepts)
        bank = None
        if method == "dff":
            concepts = None
        elif isinstance(concepts, (str, os.PathLike)) or hasattr(concepts, "ks"):  # a path, preset or ConceptBank
            from fseg_jax.concepts import resolve_concepts

            bank = resolve_concepts(concepts)
        model = resolve_model(model if model is not None else _recorded_model(bank, method))
        layers = tuple(layer_list(layer, model))
        if bank is not None:
            from fseg_jax.concepts import check_compatible

            check_compatible(
                bank, int(model.config.embed_dim) * len(layers), model_name=getattr(model.config, "name", None),
                layer=layers[0] if len(layers) == 1 else layers, model_source=model_source(model),
            )
            if k is None:
                if len(bank.ks) != 1:
                    raise ValueError(f"the concept bank holds k in {list(bank.ks)}: pass k= to choose one")
                k = bank.ks[0]
            concepts = bank[int(k)]
        classes = bank.classes(k) if bank is not None and bank.has_names(k) else None
        return cls(
            model=model, concepts=concepts, k=k, method=method, layers=layers, n_components=n_components, seed=seed,
            solver=solver, tol=tol, max_iter=max_iter, dtype=dtype, bucket=bucket, batch_size=batch_size,
            classes=classes,
        )

    @property
    def feature_dim(self) -> int:
        """d: the model's width times the number of layers."""
        return int(self.model.config.embed_dim) * len(self.layers)

    @property
    def options(self) -> ProgramOptions:
        """The static options of the jitted programs."""
        given = {"solver": self.solver, "tol": self.tol, "max_iter": self.max_iter}
        return ProgramOptions(
            method=self.method,
            layers=self.layers,
            n_components=self.k if self.method == "dff" else int(self.n_components),
            seed=int(self.seed),
            solver_kwargs=tuple(sorted((name, value) for name, value in given.items() if value is not None)),
        )

    @property
    def program_concepts(self) -> np.ndarray:
        """The (m, d) float32 matrix the programs take: the concepts, or for ``"dff"`` zeros that fix m = k."""
        if self.concepts is None:
            return np.zeros((self.k, self.feature_dim), np.float32)
        return self.concepts

    @functools.cached_property
    def compute_model(self):
        """The model computing in ``dtype`` (parameters shared with ``model``)."""
        return self.model if self.dtype is None else with_compute_dtype(self.model, self.dtype)

    def segment(
        self, images, *, return_weights: bool = False, classes: bool = False, devices: Sequence | None = None
    ):
        """Label maps of ``images`` (as :func:`segment` takes and returns them).

        ``classes``: class labels (indices into ``self.classes.names``) instead of concept labels; ValueError
        when the pipeline has no classes. ``devices`` (default: every local device): each batch is split over
        them along the batch axis, the parameters replicated; a batch is padded to a multiple of their number.
        """
        if classes and self.classes is None:
            raise ValueError(_no_classes_message(self))
        images_list, kind = collect_images(images)
        model = self.compute_model
        patch = model.config.patch_size
        graphdef, state = nnx.split(model)
        options = self.options
        devices = list(jax.local_devices() if devices is None else devices)
        mesh = Mesh(np.asarray(devices), ("batch",))
        state, concepts_j = jax.device_put((state, jnp.asarray(self.program_concepts)), NamedSharding(mesh, P()))
        batch_sharding = NamedSharding(mesh, P("batch"))

        # group by padded size and dtype: one compiled program per group shape
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images_list):
            hp, wp = padded_size(im.shape[0], im.shape[1], patch, self.bucket)
            groups.setdefault((hp, wp, im.dtype.str), []).append(i)

        outputs: list[Any] = [None] * len(images_list)
        for (hp, wp, _), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                idx = members[start : start + self.batch_size]
                padded_b = -(-_next_pow2(len(idx), self.batch_size) // len(devices)) * len(devices)
                batch = np.stack([_pad_edge(images_list[i], hp, wp) for i in idx])
                if padded_b > len(idx):
                    batch = np.concatenate([batch, np.repeat(batch[-1:], padded_b - len(idx), axis=0)])
                batch = jax.device_put(batch, batch_sharding)
                out = jax.device_get(segment_padded(graphdef, options, state, concepts_j, batch))
                for j, i in enumerate(idx):
                    h, w = images_list[i].shape[:2]
                    labels_j, weights_j, components_j, mapping_j = (None if o is None else o[j] for o in out)
                    labels_j = labels_j[:h, :w]
                    if classes:
                        labels_j = self.classes.map(labels_j)
                    outputs[i] = (labels_j, weights_j, components_j, mapping_j)

        if kind == "single":
            pack = lambda items: items[0]  # noqa: E731
        elif kind == "batch":
            pack = np.stack
        else:
            pack = list
        labels = pack([o[0] for o in outputs])
        if not return_weights and self.method != "dff":
            return labels
        weights = pack([o[1] for o in outputs])
        components = pack([o[2] for o in outputs]) if self.method in ("factorize", "dff") else None
        mapping = pack([o[3] for o in outputs]) if self.method == "factorize" else None
        return SegmentResult(labels, weights, components, mapping)

    def token_fn(self):
        """``(fn, params)``: the pure per-tile function of :func:`make_token_fn` (see there) and its inputs."""
        model = self.compute_model
        graphdef, state = nnx.split(model)
        config = model.config
        options = self.options

        def fn(params, images_bhw3):
            x = preprocess(images_bhw3, config, size=tuple(images_bhw3.shape[1:3]))
            model_ = nnx.merge(graphdef, params["model"])
            feats = token_features(model_, x, list(options.layers))
            return jax.vmap(lambda f: _token_scores(f, params["concepts"], options))(feats)

        return fn, {"model": state, "concepts": jnp.asarray(self.program_concepts)}


def segment(
    images,
    concepts=None,
    *,
    model=None,
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
    devices: Sequence | None = None,
    classes: bool = False,
):
    """Segment one image or many into concepts, or into the classes a named bank groups them in.

    Args:
        images: one image or several. One image: an (H, W, 3) array (uint8 0..255, uint16, or float in
            [0, 1]), a PIL image or a file path; a batch: a (B, H, W, 3) array; or a list of those (sizes may
            differ). Grayscale is replicated to RGB, RGBA is composited over white (see ``fseg_jax.io``).
            Images smaller than a patch (down to 1x1) are padded by edge replication to one patch.
            Inputs are never modified.
        concepts: a ``ConceptBank`` (then ``k`` picks one of its banks), a (k, d) array of concepts, or a path /
            preset name understood by ``fseg_jax.concepts.resolve_concepts``. Not used by ``"dff"``.
            Negative entries (rounding noise in published banks) are clipped to 0 in a copy; empty banks and
            all-zero concepts are refused (``fseg_jax.factorization.check_concepts``, as ``fseg_jax.project`` does).
        model: a model with ``config`` and ``forward_intermediates`` (``VisionTransformer``, ``ResNet50``), a
            preset name or a converted model directory (loaded once and kept in memory); None (default): the
            model the concept bank records (a bank made by ``build_concepts`` or imported with a preset).
        k: the bank size to use from a ``ConceptBank``; for ``"dff"`` the number of NMF components.
        method: ``"project"``, ``"nearest"``, ``"factorize"`` or ``"dff"`` (see the module docs).
        layer: block whose output is used (negative counts from the end); a list concatenates several blocks.
        return_weights: also return the token-level weights (a :class:`SegmentResult`).
        n_components: free NMF components for ``"factorize"`` (the original uses 20).
        seed: seed of the NMF's start (``"factorize"``, ``"dff"``), the same for every image: the components
            of ``"dff"`` are ``fseg_jax.factorize(x_dn, k, seed=seed).w.T`` of the image's (d, n) matrix of
            channels by tokens, the matrix the original factorises.
        batch_size: images per compiled call (batches are padded to a power of two up to this).
        bucket: pad images to a multiple of this many pixels (a multiple of the patch size) instead of the
            patch size, so images of nearby sizes share one compilation. The model then sees more edge
            padding, which changes its features slightly; None (default) pads to the patch size, as the
            original does.
        dtype: compute dtype of the model's forward pass, e.g. ``jnp.bfloat16`` on GPU/TPU (parameters stay
            float32; the NMF and everything after the model run in float32). None: the model's own (float32).
        solver, tol, max_iter: passed to the NMF core (``fseg_jax.factorization``) when given; its defaults otherwise.
        devices: the devices a batch is split over (default: every local device, e.g. all GPUs of a host);
            the labels are the same whatever the split.
        classes: return class labels: each concept label mapped to its class, an index into
            ``bank.classes(k).names`` (concepts that share a name are one class, see ``ConceptBank.with_names``).
            Needs a ``ConceptBank`` (or bank path or preset) with names for ``k``: ValueError otherwise, before
            anything is computed. Weights stay per concept.

    Returns:
        int32 labels: (H, W) for one image, (B, H, W) for a batch array, a list of (H, W) for a list input.
        A :class:`SegmentResult` instead when ``return_weights`` is true or ``method`` is ``"dff"``.
    """
    pipeline = Pipeline.create(
        concepts, model=model, k=k, method=method, layer=layer, n_components=n_components, seed=seed,
        solver=solver, tol=tol, max_iter=max_iter, dtype=dtype, bucket=bucket, batch_size=batch_size,
    )
    return pipeline.segment(images, return_weights=return_weights, classes=classes, devices=devices)


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

    ``model``, ``concepts_kd`` and ``k`` are as ``model``, ``concepts`` and ``k`` of :func:`segment` (a model,
    preset or directory, or None for the bank's own; a (k, d) array, or a bank and the k to use from it); for
    ``"dff"`` ``concepts_kd`` may be None and ``k`` is the number of components. ``params`` holds the model
    state and the concepts; ``dtype`` (e.g. ``jnp.bfloat16``) runs the forward pass in that compute dtype
    (parameters stay float32).
    """
    pipeline = Pipeline.create(
        concepts_kd, model=model, k=k, method=method, layer=layer, n_components=n_components, seed=seed,
        solver=solver, tol=tol, max_iter=max_iter, dtype=dtype,
    )
    return pipeline.token_fn()


def _recorded_model(bank, method: str) -> str:
    """The preset name or directory a concept bank records, for a call given no model; ValueError otherwise."""
    from fseg_jax.models.config import preset_names

    if bank is None:
        what = "method 'dff' uses no concept bank" if method == "dff" else "a concepts array records no model"
        raise ValueError(f"no model given and {what}: {_MODEL_HELP}")
    recorded = bank.model
    if recorded is None:
        raise ValueError(f"no model given and the concept bank records none: {_MODEL_HELP}")
    if os.path.isabs(recorded):
        if not Path(recorded).is_dir():
            raise ValueError(f"the concept bank was made with the model in {recorded}, which no longer exists: "
                             f"{_MODEL_HELP}")
        return recorded
    if recorded not in preset_names():
        raise ValueError(f"the concept bank records model {recorded!r}, which is neither a preset nor a directory: "
                         f"{_MODEL_HELP}")
    return recorded


def _check_method(method: str, k, concepts) -> None:
    """The method is known, ``"dff"`` has its number of components k, the other methods have concepts."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "dff":
        if k is None or isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError("method 'dff' needs k >= 1, the number of NMF components: pass k=")
    elif concepts is None:
        raise ValueError(f"method {method!r} needs concepts: pass a ConceptBank, a (k, d) array, or a bank path "
                         "or preset")


def _no_classes_message(pipeline: Pipeline) -> str:
    if pipeline.method == "dff":
        return "method 'dff' labels NMF components, which have no names: classes=True needs a concept method"
    return (
        f"classes=True needs concepts with names, but these k={pipeline.k} concepts have none: pass a ConceptBank "
        "(or bank file) whose concepts are named (fseg-jax concepts name, ConceptBank.with_names)"
    )


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --- the jitted program ---------------------------------------------------------------------------------------


@jit(static_argnames=("graphdef", "options"))
def segment_padded(
    graphdef,
    options: ProgramOptions,
    state,
    concepts_kd: Float[Array, "m d"],
    images_bhw3: Shaped[Array, "b hp wp 3"],
) -> tuple[Int[Array, "b hp wp"], Float[Array, "b h w m"], Float[Array, "b m d"] | None, Int[Array, "b m"] | None]:
    """The whole pipeline as one pure jitted program, for images already padded to the patch size.

    Args:
        graphdef, state: ``nnx.split(model)``.
        options: :class:`ProgramOptions` (``Pipeline.options``), static.
        concepts_kd: (m, d) float32 (``Pipeline.program_concepts``).
        images_bhw3: (B, Hp, Wp, 3) uint8 or float 0..1, Hp and Wp multiples of the patch size.

    Returns:
        labels (B, Hp, Wp) int32, token weights (B, h, w, m') float32, NMF components (B, m', d) and the
        component -> concept map (B, m') int32 (None when the method has none).
    """
    model = nnx.merge(graphdef, state)
    _, hp, wp, _ = images_bhw3.shape
    x = preprocess(images_bhw3, model.config, size=(hp, wp))
    feats = token_features(model, x, list(options.layers))

    def one(feats_hwd):
        weights_hwm, components_md, mapping_m = token_weights(feats_hwd, concepts_kd, options)
        labels = upsample_argmax(weights_hwm, (hp, wp))
        if mapping_m is not None:
            labels = mapping_m[labels]
        return labels, weights_hwm, components_md, mapping_m

    return jax.vmap(one)(feats)


def token_weights(
    feats_hwd: Float[Array, "h w d"], concepts_kd: Float[Array, "m d"], options: ProgramOptions
) -> tuple[Float[Array, "h w m"], Float[Array, "m d"] | None, Int[Array, " m"] | None]:
    """Per image, pure: (h, w, m) weights, plus the NMF components (m, d) and component -> concept map (m,)
    (None for methods without them). ``feats_hwd``: (h, w, d) ReLU'd tokens; ``concepts_kd``: (k, d)."""
    h, w, d = feats_hwd.shape
    x_nd = feats_hwd.reshape(h * w, d)
    kwargs = dict(options.solver_kwargs)
    if options.method == "project":
        res = factorization.nnls(x_nd, concepts_kd, **kwargs)
        return res.w.reshape(h, w, -1), None, None
    if options.method == "nearest":
        sim = _unit_rows(x_nd) @ _unit_rows(concepts_kd).T
        return sim.reshape(h, w, -1), None, None
    # "factorize" / "dff": the original factorises the (d, n) matrix (channels x tokens) with scikit-learn's
    # NMF(init="random", random_state=seed); the same matrix, the same start and the same coordinate-descent
    # sweeps ("hals") reproduce its factors.
    res = factorization.nmf(x_nd.T, options.n_components, options.seed, **kwargs)
    components_md = res.w.T
    weights_nm = res.h.T
    mapping = None
    if options.method == "factorize":
        mapping = jnp.argmax(_unit_rows(components_md) @ _unit_rows(concepts_kd).T, axis=-1).astype(jnp.int32)
    return weights_nm.reshape(h, w, -1), components_md, mapping


def _token_scores(feats_hwd, concepts_kd, options: ProgramOptions):
    weights, _, mapping = token_weights(feats_hwd, concepts_kd, options)
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
