"""Segment H&E images into concepts: every F-Seg mode, batched and jitted end to end.

The pipeline for a batch of images of one padded size is a single jitted program: normalise, run the model
to the requested block, ReLU, solve for the token weights (vmapped over images, each with its own stopping
rule), upsample the weights bilinearly to the padded image size and take the argmax, one concept at a time so that
no ``(H, W, k)`` float array is ever held. Images are grouped by padded size on the host,
so a folder of varied sizes compiles once per distinct size (or once per ``bucket`` with a coarser bucket).

Every front end (:func:`segment`, :func:`make_token_fn`, ``segment_slide`` / ``SlideSegmenter``, ``concept_atlas``,
the command line) describes its run as one frozen :class:`Pipeline`, built and checked once by ``Pipeline.create``
from the options of ``fseg_jax.options``; its one batch runner feeds the public, pure jitted programs
:func:`segment_padded` (labels) and :func:`weights_padded` (token weights only), and the slide's tile step takes
``Pipeline.tile_fn()``.

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
from fseg_jax.models import with_compute_dtype
from fseg_jax.options import (
    DTYPES,
    METHODS,
    NMF_SOLVERS,
    RUN_DEFAULTS,
    SOLVERS,
    check_choice,
    check_components,
    check_devices,
    check_int,
    check_layers,
    check_optional_int,
    check_tol,
)
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
    """One segmentation run, described once and checked once: what :func:`segment`, :func:`make_token_fn`,
    ``segment_slide`` / ``SlideSegmenter``, ``concept_atlas`` and the command line run.

    Build it with :meth:`create`, which takes the user-facing arguments (model and bank as objects, names or
    paths; every keyword with its default in ``fseg_jax.options.RUN_DEFAULTS``) and resolves them once; the
    constructor takes resolved values and checks them. Then :meth:`segment` labels images and :meth:`token_fn`
    gives the pure per-tile function. Each option is checked here, before any work: a bad value is one
    ``ValueError`` naming it, the same whichever front end passed it.

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
        batch: images (or slide tiles) per compiled call.
        classes: the bank's classes for k (``ConceptBank.classes``: its concepts grouped by name), or None when
            the bank names none of them (or the concepts came as an array); ``segment(classes=True)`` maps the
            labels through them.
        model_source: how the model was named (a preset, a folder, ``"<preset>-random"``), for the records of a
            run (a slide's summary.json); the config's name when a model object was given.
        bank_source: how the concepts were named (a bank path or preset, a ``ConceptBank``'s repr), ``"array"`` for
            a matrix, None for dff.
    """

    model: Any
    concepts: np.ndarray | None
    k: int | None = RUN_DEFAULTS["k"]
    method: str = RUN_DEFAULTS["method"]
    layers: tuple[int, ...] = (RUN_DEFAULTS["layer"],)
    n_components: int = RUN_DEFAULTS["n_components"]
    seed: int = RUN_DEFAULTS["seed"]
    solver: str | None = RUN_DEFAULTS["solver"]
    tol: float | None = RUN_DEFAULTS["tol"]
    max_iter: int | None = RUN_DEFAULTS["max_iter"]
    dtype: Any = RUN_DEFAULTS["dtype"]
    bucket: int | None = RUN_DEFAULTS["bucket"]
    batch: int = RUN_DEFAULTS["batch"]
    classes: ConceptClasses | None = None
    model_source: str | None = None
    bank_source: str | None = None

    def __post_init__(self):
        _check_options(method=self.method, k=self.k, concepts=self.concepts, layer=self.layers,
                       n_components=self.n_components, seed=self.seed, solver=self.solver, tol=self.tol,
                       max_iter=self.max_iter, dtype=self.dtype, bucket=self.bucket, batch=self.batch)
        if self.classes is not None and self.method == "dff":
            raise ValueError("method 'dff' labels NMF components, which have no names: leave classes unset")
        object.__setattr__(self, "layers", tuple(layer_list(list(self.layers), self.model)))
        padded_size(1, 1, self.model.config.patch_size, self.bucket)  # checks the bucket against the patch
        if self.dtype is not None:
            object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        if self.model_source is None:
            object.__setattr__(self, "model_source", getattr(self.model.config, "name", type(self.model).__name__))
        object.__setattr__(self, "_placed", {})
        if self.method == "dff":
            object.__setattr__(self, "k", int(self.k))
            object.__setattr__(self, "concepts", None)
            check_components("dff", self.k, self.k, self.feature_dim, f"a model of width {self.feature_dim}")
            return
        if self.method == "factorize":
            check_components("factorize", int(self.n_components), int(self.n_components), self.feature_dim,
                             f"a model of width {self.feature_dim}")
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
        if self.bank_source is None:
            object.__setattr__(self, "bank_source", "array")
        check_classes(self.classes, self.k)

    @classmethod
    def create(
        cls,
        concepts=None,
        *,
        model=None,
        k: int | None = RUN_DEFAULTS["k"],
        method: str = RUN_DEFAULTS["method"],
        layer: int | Sequence[int] = RUN_DEFAULTS["layer"],
        n_components: int = RUN_DEFAULTS["n_components"],
        seed: int = RUN_DEFAULTS["seed"],
        solver: str | None = RUN_DEFAULTS["solver"],
        tol: float | None = RUN_DEFAULTS["tol"],
        max_iter: int | None = RUN_DEFAULTS["max_iter"],
        dtype=RUN_DEFAULTS["dtype"],
        bucket: int | None = RUN_DEFAULTS["bucket"],
        batch: int = RUN_DEFAULTS["batch"],
        random_init: int | None = RUN_DEFAULTS["random_init"],
        depth: int | None = RUN_DEFAULTS["depth"],
    ) -> Pipeline:
        """Resolve and check the arguments of :func:`segment` (see there) into a pipeline.

        Every option is checked first, before a model or bank is loaded. ``model`` may be a model, a preset
        name or a converted model directory (loaded once per process and kept: ``fseg_jax.hub.resolve_model``);
        None takes the model the concept bank records; with ``dtype`` given, a model loaded or built here stores
        its weights in that dtype (``param_dtype``: half the memory in bfloat16, the same forward). ``random_init`` (a seed) builds a random-weight model of
        the preset ``model`` names (or the bank records) in memory, named ``<preset>-random``, cut to ``depth``
        blocks when given (``fseg_jax.hub.random_model``); a bank made with such a model records that name and
        needs ``random_init`` again. A bank given by path, preset or ``ConceptBank`` is checked against the model
        (width, and a warning when it was made for another model or layer); ``k`` picks one of its matrices,
        and the bank's names for that k, if any, become the pipeline's ``classes``. Upstream banks named by
        preset are cached in ``fseg_jax.concepts.default_cache_dir()``, as the command line caches them.
        """
        from fseg_jax.hub import model_source, resolve_model

        _check_options(method=method, k=k, concepts=concepts, layer=layer, n_components=n_components, seed=seed,
                       solver=solver, tol=tol, max_iter=max_iter, dtype=dtype, bucket=bucket, batch=batch)
        if depth is not None and random_init is None:
            raise ValueError(f"depth={depth!r} applies to random-weight models only: pass random_init= (a seed) too")
        check_optional_int("random_init", random_init, minimum=0)
        check_optional_int("depth", depth)
        bank = None
        bank_source = None
        if method == "dff":
            concepts = None
        elif isinstance(concepts, (str, os.PathLike)) or hasattr(concepts, "ks"):  # a path, preset or ConceptBank
            from fseg_jax.concepts import resolve_concepts

            bank_source = repr(concepts)
            if isinstance(concepts, (str, os.PathLike)):  # a file by its absolute path, so it reads from anywhere
                bank_source = str(Path(concepts).resolve()) if Path(concepts).is_file() else str(concepts)
            bank = resolve_concepts(concepts)
        spec = model if model is not None else _recorded_model(bank, method, random_init is not None)
        stored = {} if dtype is None or jnp.dtype(dtype) == jnp.float32 else {"param_dtype": jnp.dtype(dtype)}
        if random_init is not None:
            from fseg_jax.hub import random_model

            if not isinstance(spec, str):
                raise ValueError("random_init builds a preset's architecture: pass model= as a preset name")
            preset = spec.removesuffix(_RANDOM_SUFFIX)
            model = random_model(preset, seed=random_init, depth=depth, **stored)
            source = preset + _RANDOM_SUFFIX
        else:
            source = str(spec) if isinstance(spec, (str, os.PathLike)) else None
            model = resolve_model(spec, **stored)
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
            solver=solver, tol=tol, max_iter=max_iter, dtype=dtype, bucket=bucket, batch=batch, classes=classes,
            model_source=source, bank_source=bank_source,
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

    def check_tokens(self, n_tokens: int, where: str) -> None:
        """ValueError when an NMF method asks for more components than ``n_tokens`` tokens allow (``where``
        names the image or tile)."""
        check_components(self.method, self.options.n_components, n_tokens, self.feature_dim, where)

    def placed(self, devices: Sequence | None = None):
        """``(mesh, graphdef, state, concepts)``: the compute model's parameters and the program concepts
        replicated over a 1-D mesh of ``devices`` (default: every local device), placed once per pipeline and
        device set and reused by every later call."""
        devices = check_devices(devices)
        devices = tuple(jax.local_devices() if devices is None else devices)
        if devices not in self._placed:
            graphdef, state = nnx.split(self.compute_model)
            mesh = Mesh(np.asarray(devices), ("batch",))
            state, concepts_j = jax.device_put((state, jnp.asarray(self.program_concepts)), NamedSharding(mesh, P()))
            self._placed[devices] = (mesh, graphdef, state, concepts_j)
        return self._placed[devices]

    def segment(
        self, images, *, return_weights: bool = False, classes: bool = False, devices: Sequence | None = None
    ):
        """Label maps of ``images`` (as :func:`segment` takes and returns them).

        ``classes``: class labels (indices into ``self.classes.names``) instead of concept labels; ValueError
        when the pipeline has no classes. ``devices`` (default: every local device): each batch is split over
        them along the batch axis, the parameters replicated (placed once, see :meth:`placed`); a batch is
        padded to a multiple of their number.
        """
        if classes and self.classes is None:
            raise ValueError(_no_classes_message(self))
        images_list, kind = collect_images(images)
        outputs: list[Any] = [None] * len(images_list)
        for idx, out in self._run(images_list, segment_padded, devices):
            for j, i in enumerate(idx):
                h, w = images_list[i].shape[:2]
                labels_j, weights_j, components_j, mapping_j = (None if o is None else o[j] for o in out)
                labels_j = labels_j[:h, :w]
                if classes:
                    labels_j = self.classes.map(labels_j)
                outputs[i] = (labels_j, weights_j, components_j, mapping_j)

        pack = functools.partial(_pack, kind=kind)
        labels = pack([o[0] for o in outputs])
        if not return_weights and self.method != "dff":
            return labels
        weights = pack([o[1] for o in outputs])
        components = pack([o[2] for o in outputs]) if self.method in ("factorize", "dff") else None
        mapping = pack([o[3] for o in outputs]) if self.method == "factorize" else None
        return SegmentResult(labels, weights, components, mapping)

    def weights(self, images, *, devices: Sequence | None = None):
        """The token weights of ``images`` alone, (h, w, m) float32 per image (batched as :func:`segment`
        batches labels), as ``segment(..., return_weights=True).weights`` gives them, without the labels: no
        upsampling, no argmax."""
        images_list, kind = collect_images(images)
        outputs: list[Any] = [None] * len(images_list)
        for idx, out in self._run(images_list, weights_padded, devices):
            for j, i in enumerate(idx):
                outputs[i] = out[j]
        return _pack(outputs, kind)

    def _run(self, images_list, program, devices):
        """The one batch runner of the pipeline's programs: images grouped by padded size and dtype (one
        compilation per group shape), edge-padded, cut into batches of ``batch`` padded by :func:`pad_batch`,
        split over the devices the parameters were placed on once (:meth:`placed`). Yields (the images'
        indices, the program's host outputs for the batch)."""
        mesh, graphdef, state, concepts_j = self.placed(devices)
        patch = self.model.config.patch_size
        options = self.options
        n_dev = mesh.devices.size
        batch_sharding = NamedSharding(mesh, P("batch"))
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(images_list):
            hp, wp = padded_size(im.shape[0], im.shape[1], patch, self.bucket)
            self.check_tokens((hp // patch) * (wp // patch), f"image {i} ({im.shape[0]} x {im.shape[1]} px)")
            groups.setdefault((hp, wp, im.dtype.str), []).append(i)
        for (hp, wp, _), members in groups.items():
            for start in range(0, len(members), self.batch):
                idx = members[start : start + self.batch]
                batch = pad_batch(np.stack([_pad_edge(images_list[i], hp, wp) for i in idx]), self.batch, n_dev)
                batch = jax.device_put(batch, batch_sharding)
                yield idx, jax.device_get(program(graphdef, options, state, concepts_j, batch))

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

    def tile_fn(self):
        """``(fn, params)`` for the slide's tile step: :meth:`token_fn`'s function, except that for ``"factorize"``
        it returns ``(scores (B, h, w, k), component weights (B, h, w, m), component -> concept map (B, m))``, so
        that the step labels pixels as :func:`segment` does (the component weights upsampled, argmaxed, then
        mapped: the one meaning of ``"factorize"``) and keeps the per-concept scores as the tile's weights."""
        if self.method != "factorize":
            return self.token_fn()
        model = self.compute_model
        graphdef, state = nnx.split(model)
        config = model.config
        options = self.options

        def one(feats_hwd, concepts_kd):
            weights, _, mapping = token_weights(feats_hwd, concepts_kd, options)
            return _concept_scores(weights, mapping, concepts_kd.shape[0]), weights, mapping

        def fn(params, images_bhw3):
            x = preprocess(images_bhw3, config, size=tuple(images_bhw3.shape[1:3]))
            feats = token_features(nnx.merge(graphdef, params["model"]), x, list(options.layers))
            return jax.vmap(lambda f: one(f, params["concepts"]))(feats)

        return fn, {"model": state, "concepts": jnp.asarray(self.program_concepts)}


def segment(
    images,
    concepts=None,
    *,
    return_weights: bool = False,
    classes: bool = False,
    devices: Sequence | None = None,
    **options,
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
        return_weights: also return the token-level weights (a :class:`SegmentResult`).
        classes: return class labels: each concept label mapped to its class, an index into
            ``bank.classes(k).names`` (concepts that share a name are one class, see ``ConceptBank.with_names``).
            Needs a ``ConceptBank`` (or bank path or preset) with names for ``k``: ValueError otherwise, before
            anything is computed. Weights stay per concept.
        devices: the devices a batch is split over (default: every local device, e.g. all GPUs of a host);
            the labels are the same whatever the split.
        **options: the run's options, passed untouched to :meth:`Pipeline.create` (defaults in
            ``fseg_jax.options.RUN_DEFAULTS``):

            - ``model``: a model with ``config`` and ``forward_intermediates`` (``VisionTransformer``,
              ``ResNet50``), a preset name or a converted model directory (loaded once and kept in memory);
              None (default): the model the concept bank records. ``random_init`` (a seed) and ``depth``: a
              random-weight model of that preset, built in memory.
            - ``k``: the bank size to use from a ``ConceptBank``; for ``"dff"`` the number of NMF components
              (at most min(tokens, feature dimension), as ``fseg_jax.factorize`` requires).
            - ``method``: ``"project"``, ``"nearest"``, ``"factorize"`` or ``"dff"`` (see the module docs).
            - ``layer``: block whose output is used (negative counts from the end); a list concatenates several.
            - ``n_components``: free NMF components for ``"factorize"`` (the original uses 20).
            - ``seed``: seed of the NMF's start (``"factorize"``, ``"dff"``), the same for every image: the
              components of ``"dff"`` are ``fseg_jax.factorize(x_dn, k, seed=seed).w.T`` of the image's (d, n)
              matrix of channels by tokens, the matrix the original factorises.
            - ``batch``: images per compiled call (batches are padded to a power of two up to this).
            - ``bucket``: pad images to a multiple of this many pixels (a multiple of the patch size) instead of
              the patch size, so images of nearby sizes share one compilation. The model then sees more edge
              padding, which changes its features slightly; None (default) pads to the patch size, as the
              original does.
            - ``dtype``: compute dtype of the model's forward pass, e.g. ``jnp.bfloat16`` on GPU/TPU (parameters
              stay float32; the NMF and everything after the model run in float32). None: the model's own.
            - ``solver``, ``tol``, ``max_iter``: passed to the NMF core (``fseg_jax.factorization``) when given.

    Returns:
        int32 labels: (H, W) for one image, (B, H, W) for a batch array, a list of (H, W) for a list input.
        A :class:`SegmentResult` instead when ``return_weights`` is true or ``method`` is ``"dff"``.
    """
    pipeline = Pipeline.create(concepts, **options)
    return pipeline.segment(images, return_weights=return_weights, classes=classes, devices=devices)


def make_token_fn(model, concepts_kd, **options):
    """A pure function from images to token-level concept weights, for callers that jit and shard it.

    Returns ``(fn, params)`` with ``fn(params, images_bhw3) -> (B, h, w, k)`` float32: images are uint8 (or float
    0..1) with H and W multiples of the patch size (no padding is done here), h = H/p, w = W/p, and higher
    values mean more of that concept: NNLS weights (``"project"``), cosine similarities (``"nearest"``), or for
    ``"factorize"`` the largest weight among the NMF components mapped to each concept (0 for concepts no
    component maps to), so the argmax over concepts is the original's label at every token.

    ``model`` and ``concepts_kd`` are ``model`` and ``concepts`` of :func:`segment` (a model, preset or
    directory, or None for the bank's own; a (k, d) array, or a bank and ``k=`` the k to use from it); for
    ``"dff"`` ``concepts_kd`` may be None and ``k`` is the number of components. ``**options`` are the run's
    options, passed untouched to :meth:`Pipeline.create`. ``params`` holds the model state and the concepts;
    ``dtype`` (e.g. ``jnp.bfloat16``) runs the forward pass in that compute dtype (parameters stay float32).
    """
    return Pipeline.create(concepts_kd, model=model, **options).token_fn()


def padded_batch_size(n: int, cap: int, n_devices: int = 1) -> int:
    """How many entries a batch of ``n`` is computed as: the next power of two per device, times the device
    count, at most ``cap`` rounded up to a multiple of the device count. A few static shapes, so a few
    compilations, and a batch of 3 is not computed as 16."""
    cap = -(-cap // n_devices) * n_devices
    per_device = 1
    while per_device * n_devices < n:
        per_device *= 2
    return min(per_device * n_devices, cap)


def pad_batch(batch_bhw3: np.ndarray, cap: int, n_devices: int = 1) -> np.ndarray:
    """The one padding policy of every batched front end (``segment``'s images, slide tiles): a batch of n is
    computed as :func:`padded_batch_size` entries, the extra ones copies of the last (their results are
    dropped). A new array when padded; the input is never modified."""
    n = batch_bhw3.shape[0]
    size = padded_batch_size(n, cap, n_devices)
    if size <= n:
        return batch_bhw3
    return np.concatenate([batch_bhw3, np.repeat(batch_bhw3[-1:], size - n, axis=0)])


_RANDOM_SUFFIX = "-random"


def _check_options(*, method, k, concepts, layer, n_components, seed, solver, tol, max_iter, dtype, bucket,
                   batch) -> None:
    """Every option of a run that can be checked without the model: types, ranges and choices."""
    check_choice("method", method, METHODS)
    check_optional_int("k", k)
    check_layers(layer)
    check_int("n_components", n_components)
    check_int("seed", seed, minimum=0)
    check_int("batch", batch)
    check_optional_int("bucket", bucket)
    check_optional_int("max_iter", max_iter)
    check_tol(tol)
    if dtype is not None:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = dtype
        check_choice("dtype", name, DTYPES)
    if method == "dff" and k is None:
        raise ValueError("method 'dff' needs k >= 1, the number of NMF components: pass k=")
    if method != "dff" and concepts is None:
        raise ValueError(f"method {method!r} needs concepts: pass a ConceptBank, a (k, d) array, or a bank path "
                         "or preset")
    choices = SOLVERS if method == "project" else NMF_SOLVERS
    if solver is not None and (method == "nearest" or solver not in choices):
        allowed = "none" if method == "nearest" else ", ".join(choices)
        raise ValueError(f"solver {solver!r} does not apply to method {method!r} (solvers: {allowed})")


def _recorded_model(bank, method: str, random: bool) -> str:
    """The preset name or directory a concept bank records, for a call given no model; ValueError otherwise."""
    from fseg_jax.models.config import preset_names

    if bank is None:
        what = "method 'dff' uses no concept bank" if method == "dff" else "a concepts array records no model"
        raise ValueError(f"no model given and {what}: {_MODEL_HELP}")
    recorded = bank.model
    if recorded is None:
        raise ValueError(f"no model given and the concept bank records none: {_MODEL_HELP}")
    if recorded.endswith(_RANDOM_SUFFIX) and recorded.removesuffix(_RANDOM_SUFFIX) in preset_names():
        if not random:
            raise ValueError(f"the concept bank was made with a random-weight model, {recorded!r}: pass random_init= "
                             "(and depth=) to build it again, or pass model=")
        return recorded
    if os.path.isabs(recorded):
        if not Path(recorded).is_dir():
            raise ValueError(f"the concept bank was made with the model in {recorded}, which no longer exists: "
                             f"{_MODEL_HELP}")
        return recorded
    if recorded not in preset_names():
        raise ValueError(f"the concept bank records model {recorded!r}, which is neither a preset nor a directory: "
                         f"{_MODEL_HELP}")
    return recorded


def _no_classes_message(pipeline: Pipeline) -> str:
    if pipeline.method == "dff":
        return "method 'dff' labels NMF components, which have no names: classes=True needs a concept method"
    return (
        f"classes=True needs concepts with names, but these k={pipeline.k} concepts have none: pass a ConceptBank "
        "(or bank file) whose concepts are named (fseg-jax concepts name, ConceptBank.with_names)"
    )


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


@jit(static_argnames=("graphdef", "options"))
def weights_padded(
    graphdef, options: ProgramOptions, state, concepts_kd: Float[Array, "m d"], images_bhw3: Shaped[Array, "b hp wp 3"]
) -> Float[Array, "b h w m"]:
    """:func:`segment_padded`'s token weights alone (no upsampling, no labels), for callers that need only them."""
    model = nnx.merge(graphdef, state)
    _, hp, wp, _ = images_bhw3.shape
    feats = token_features(model, preprocess(images_bhw3, model.config, size=(hp, wp)), list(options.layers))
    return jax.vmap(lambda f: token_weights(f, concepts_kd, options)[0])(feats)


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
    return _concept_scores(weights, mapping, concepts_kd.shape[0])


def _concept_scores(weights_hwm, mapping_m, k: int):
    """(h, w, k): per concept, the largest weight among the components mapped to it (0 where none is)."""
    onehot = mapping_m[:, None] == jnp.arange(k)[None, :]
    return jnp.max(jnp.where(onehot[None, None], weights_hwm[..., :, None], 0.0), axis=-2)


def _unit_rows(a):
    """Rows scaled to unit L2 norm; all-zero rows stay zero (as scikit-learn's ``normalize`` does)."""
    norm = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
    return a / jnp.where(norm > 0, norm, 1.0)


# --- host-side helpers -------------------------------------------------------------------------------------------


def _pack(items: list, kind: str):
    """Per-image results as the input came: one item, a stacked batch, or a list."""
    if kind == "single":
        return items[0]
    return np.stack(items) if kind == "batch" else list(items)


def _pad_edge(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    return np.pad(image, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
