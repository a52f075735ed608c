"""Concept banks learned for what F-Seg does with them: non-negative projection.

F-Seg's banks are k-means centres, yet segmentation projects every token onto them by non-negative least
squares. :func:`learn_dictionary` learns the bank for that use directly, by online dictionary learning on
mini-batches of tokens: for each batch the weights ``W >= 0`` come from the NNLS core (``fseg_jax.factorization.nnls``)
with the bank fixed, then the bank takes one step of an optax optimiser (Adam by default) on the relative
reconstruction error ``||X - W C||^2 / ||X||^2`` and is projected back onto ``C >= 0``
(``optax.projections.projection_non_negative``). It starts from k-means++ seeds of the tokens, as the k-means
banks do, so the two are directly comparable.

Each step is one jitted program; with several devices the batch is split over them (the parameters
replicated), and the gradient is summed across them by XLA. Batches are drawn by a seeded permutation, so a
seed gives one bank; with ``checkpoint=`` the state (bank, optimiser state, step) is saved atomically every
``checkpoint_every`` steps and a run resumes from it. :func:`learn_concepts` does all of this from images,
gathering the tokens as ``build_concepts`` does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fseg_jax._files import atomic_path
from fseg_jax.compilation import jit
from fseg_jax.kmeans import kmeans_plusplus
from fseg_jax.factorization import nnls
from fseg_jax.options import LEARN_KS, RUN_DEFAULTS


@dataclasses.dataclass(frozen=True)
class LearnedBank:
    """What :func:`learn_dictionary` returns.

    Attributes:
        concepts: (k, d) float32, non-negative, no all-zero row.
        losses: (steps,) float32 relative reconstruction error of each step's batch, before its update.
        steps: optimiser steps taken in all (a resumed run counts the earlier ones).
    """

    concepts: np.ndarray
    losses: np.ndarray
    steps: int


def relative_error(x_nd, concepts_kd, *, solver: str = "admm") -> float:
    """``||X - W C||^2 / ||X||^2`` with W the NNLS projection of the rows of ``x_nd`` onto ``concepts_kd``."""
    x = jnp.asarray(x_nd, jnp.float32)
    w = nnls(x, jnp.asarray(concepts_kd, jnp.float32), solver=solver).w
    return float(jnp.sum((x - w @ concepts_kd) ** 2) / jnp.sum(x * x))


def learn_dictionary(
    x_nd,
    k: int,
    *,
    steps: int = 300,
    batch_tokens: int = 2048,
    optimizer=None,
    seed: int = 0,
    init=None,
    nnls_max_iter: int = 300,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    devices: Sequence | None = None,
) -> LearnedBank:
    """Learn a (k, d) non-negative bank for NNLS projection of the rows of ``x_nd``.

    Args:
        x_nd: (n, d) non-negative finite tokens (ReLU'd features), n >= k.
        k: concepts to learn.
        steps: optimiser steps (mini-batches) in all.
        batch_tokens: tokens per mini-batch (rounded up to a multiple of the device count; at most n).
        optimizer: an ``optax.GradientTransformation``; default ``optax.adam(1e-2 * mean token norm / sqrt(d))``.
        seed: draws the k-means++ start and the batches: one seed, one bank.
        init: (k, d) starting bank instead of k-means++ seeds (negatives clipped to 0).
        nnls_max_iter: iteration cap of each batch's NNLS solve (ADMM, warm enough at a few hundred).
        checkpoint: file to save the state to and resume from (written atomically).
        checkpoint_every: steps between checkpoints.
        devices: devices each batch is split over (default: every local device).

    Returns:
        A :class:`LearnedBank`.
    """
    import optax

    x = np.asarray(x_nd, np.float32)
    if x.ndim != 2 or not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("tokens must be a finite, non-negative (n, d) array (ReLU'd features)")
    n, d = x.shape
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be between 1 and the number of tokens ({n}), got {k}")
    if steps < 1 or batch_tokens < 1 or checkpoint_every < 1:
        raise ValueError("steps, batch_tokens and checkpoint_every must be >= 1")
    devices = list(jax.local_devices() if devices is None else devices)
    mesh = Mesh(np.asarray(devices), ("batch",))
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    batch = min(-(-int(batch_tokens) // len(devices)) * len(devices), n - n % len(devices) or n)
    if optimizer is None:
        scale = float(np.mean(np.linalg.norm(x, axis=1))) / np.sqrt(d)
        optimizer = optax.adam(1e-2 * max(scale, 1e-12))

    state = None
    if checkpoint is not None and Path(checkpoint).is_file():
        state = _load(checkpoint, optimizer.init(jnp.zeros((int(k), d), jnp.float32)))
    if state is not None:
        if state["concepts"].shape != (int(k), d) or state["seed"] != seed:
            raise ValueError(f"checkpoint {checkpoint} is of another run (k, d or seed differ); remove it or "
                             "pass another checkpoint path")
        concepts, losses, start, opt_state = state["concepts"], list(state["losses"]), state["step"], state["opt_state"]
    else:
        if init is not None:
            concepts = np.maximum(np.asarray(init, np.float32), 0.0)
            if concepts.shape != (int(k), d):
                raise ValueError(f"init must be ({k}, {d}), got {concepts.shape}")
        else:
            concepts = np.asarray(kmeans_plusplus(jnp.asarray(x), jnp.int32(n), int(k), jax.random.key(seed)))
        losses, start = [], 0
        opt_state = optimizer.init(jnp.asarray(concepts))
    concepts = _revive(concepts, x, np.random.default_rng([seed, start]))

    step_fn = _make_step(optimizer, nnls_max_iter)
    concepts_j, opt_state = jax.device_put((jnp.asarray(concepts), opt_state), replicated)
    for step in range(start, steps):
        rows = np.random.default_rng([seed, step]).choice(n, size=batch, replace=False)
        x_b = jax.device_put(x[np.sort(rows)], split)
        concepts_j, opt_state, loss = step_fn(concepts_j, opt_state, x_b)
        losses.append(float(loss))
        if not np.all(np.any(np.asarray(concepts_j) > 0, axis=1)):  # a concept died: reseed it from tokens
            revived = _revive(np.asarray(concepts_j), x, np.random.default_rng([seed, step, 1]))
            concepts_j = jax.device_put(jnp.asarray(revived), replicated)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save(checkpoint, {"concepts": np.asarray(concepts_j), "opt_state": jax.device_get(opt_state),
                               "step": step + 1, "losses": np.asarray(losses, np.float32), "seed": seed})
    return LearnedBank(np.asarray(concepts_j), np.asarray(losses, np.float32), max(steps, start))


def learn_concepts(
    model: Any,
    images_or_folder: Any,
    ks: Sequence[int] = LEARN_KS,
    *,
    layer: int | Sequence[int] = -1,
    tile: int = 224,
    tokens_per_tile: int | None = None,
    tile_filter=None,
    batch: int = RUN_DEFAULTS["batch"],
    seed: int = 0,
    steps: int = 300,
    batch_tokens: int = 2048,
    optimizer=None,
    checkpoint_dir: str | Path | None = None,
    devices: Sequence | None = None,
):
    """A concept bank learned for NNLS projection of ``model``'s tokens over ``images_or_folder``.

    The tokens are gathered as :func:`fseg_jax.build_concepts` gathers them with ``per_token=True`` (same
    ``layer``, ``tile``, ``tokens_per_tile``, ``tile_filter``, ``batch``, ``seed``), then one bank per k is
    learned by :func:`learn_dictionary` (``steps``, ``batch_tokens``, ``optimizer``, ``seed``, ``devices``);
    with ``checkpoint_dir`` each k checkpoints to ``k<k>.safetensors`` there and a rerun resumes.

    Returns:
        A ``ConceptBank`` recording the model and layer, like ``build_concepts``' banks.
    """
    from fseg_jax.concepts import ConceptBank, collect_features
    from fseg_jax.concepts.build import sorted_ks
    from fseg_jax.hub import model_source

    ks = sorted_ks(ks)
    model, layer, x_nd = collect_features(
        model, images_or_folder, layer=layer, tile=tile, per_token=True, tokens_per_tile=tokens_per_tile,
        tile_filter=tile_filter, batch=batch, seed=seed, at_least=ks[-1],
    )
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    concepts = {
        k: learn_dictionary(
            x_nd, k, steps=steps, batch_tokens=batch_tokens, optimizer=optimizer, seed=seed, devices=devices,
            checkpoint=None if checkpoint_dir is None else Path(checkpoint_dir) / f"k{k}.safetensors",
        ).concepts
        for k in ks
    }
    return ConceptBank(concepts, model=model_source(model) or getattr(model.config, "name", None), layer=layer)


def _make_step(optimizer, nnls_max_iter: int):
    import optax

    def loss_fn(c_kd, x_bd, w_bk):
        return jnp.sum((x_bd - w_bk @ c_kd) ** 2) / jnp.sum(x_bd * x_bd)

    @jit
    def step(c_kd, opt_state, x_bd):
        w_bk = jax.lax.stop_gradient(nnls(x_bd, c_kd, max_iter=nnls_max_iter).w)
        loss, grad = jax.value_and_grad(loss_fn)(c_kd, x_bd, w_bk)
        updates, opt_state = optimizer.update(grad, opt_state, c_kd)
        c_kd = optax.projections.projection_non_negative(optax.apply_updates(c_kd, updates))
        return c_kd, opt_state, loss

    return step


def _revive(concepts_kd: np.ndarray, x_nd: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace all-zero concepts (which NNLS cannot use) by random tokens with some weight."""
    dead = ~np.any(concepts_kd > 0, axis=1)
    if not dead.any():
        return concepts_kd
    alive_rows = np.flatnonzero(np.any(x_nd > 0, axis=1))
    if alive_rows.size == 0:
        raise ValueError("every token is zero: there is nothing to learn concepts from")
    out = concepts_kd.copy()
    out[dead] = x_nd[rng.choice(alive_rows, size=int(dead.sum()))]
    return out


def _save(path: str | Path, state: dict[str, Any]) -> None:
    """The state as safetensors: the bank, the losses and the optimiser state's leaves in tree order."""
    from safetensors.numpy import save_file

    tensors = {"concepts": state["concepts"], "losses": state["losses"]}
    for i, leaf in enumerate(jax.tree.leaves(state["opt_state"])):
        tensors[f"opt_{i}"] = np.asarray(leaf)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(state["step"]), "seed": str(state["seed"])})


def _load(path: str | Path, opt_template) -> dict[str, Any]:
    """A state written by :func:`_save`; ``opt_template`` (a fresh optimiser state) gives its tree shape."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    treedef = jax.tree.structure(opt_template)
    leaves = [jnp.asarray(tensors[f"opt_{i}"]) for i in range(treedef.num_leaves)]
    return {"concepts": tensors["concepts"], "losses": tensors["losses"], "step": int(meta["step"]),
            "seed": int(meta["seed"]), "opt_state": jax.tree.unflatten(treedef, leaves)}
