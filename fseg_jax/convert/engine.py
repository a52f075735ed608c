"""The conversion engine: a flat ``{name: array}`` -> a Flax NNX model, through one table of key rules.

Strict both ways: every source key is consumed by a rule or ignored by name, every model parameter is filled,
every shape is checked, and all problems are reported together in one ``ConversionError``. The converters
(``fseg_jax.convert.timm``, ``fseg_jax.convert.hf``) and the package's own format (``NATIVE_RULES``, read by
``fseg_jax.load_model``) each give it their rules.

The state dict may be any mapping {name: array}: numpy arrays, torch tensors, or a lazy mapping that
reads each tensor on access (``fseg_jax.convert.checkpoint.open_checkpoint``); each tensor is fetched
once, converted to float32 and placed in the model before the next is read, so peak memory stays near
the model's own size plus one tensor.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fseg_jax.models import build_model


class ConversionError(ValueError):
    """A checkpoint does not match the architecture; ``problems`` lists every mismatch found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.summary = message
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n  - " + "\n  - ".join(self.problems)
        super().__init__(message)


# layout transforms (torch -> flax)
def identity(a: np.ndarray) -> np.ndarray:
    return a


def linear_kernel(a: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> flax kernel (in, out)."""
    return a.T


def conv_kernel(a: np.ndarray) -> np.ndarray:
    """torch conv weight OIHW -> flax HWIO."""
    return a.transpose(2, 3, 1, 0)


Transform = Callable[[np.ndarray], np.ndarray]

Rule = tuple[str, str, Transform] | tuple[str, str, Transform, tuple[int, int]]


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy/jax array or torch tensor -> float32 numpy (torch bfloat16 has no numpy twin: go via float)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _abstract_model(config, **model_kwargs):
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0), **model_kwargs))


NATIVE_RULES: tuple[Rule, ...] = ((r"(.+)", r"\1", identity),)
"""fseg_jax's own format (``fseg_jax.save_model``): keys are the dotted NNX parameter paths."""



def fill_model(state_dict: Mapping[str, Any], config, rules: tuple[Rule, ...], ignored: tuple[str, ...] = (),
               **model_kwargs):
    """The model of ``config`` with parameters taken from ``state_dict`` through ``rules``, strictly.

    ``rules`` map source keys (full regex match) to dotted NNX paths with a layout transform; a rule with a
    fourth element ``(index, count)`` fills that slice of ``count`` equal parts along the parameter's last axis
    (separate query, key and value weights fused into one ``qkv``). Keys matching ``ignored`` are skipped by
    name. Every other key, every unfilled parameter or part and every shape mismatch is collected into one
    ``ConversionError``.
    """
    model = _abstract_model(config, **model_kwargs)
    graphdef, state = nnx.split(model)
    flat = nnx.traversals.flatten_mapping(nnx.to_pure_dict(state))
    targets = {_dotted(path): path for path in flat}
    compiled = [(re.compile(rule[0]), *rule[1:]) for rule in rules]
    ignored_re = [re.compile(p) for p in ignored]

    unexpected, mismatched, filled = [], [], {}
    parts: dict[str, dict[int, np.ndarray | None]] = {}  # destination -> {part index: value (None: mismatched)}
    part_counts: dict[str, int] = {}
    for key in list(state_dict.keys()):
        if any(p.fullmatch(key) for p in ignored_re):
            continue
        for src, dst, fn, *part in compiled:
            match = src.fullmatch(key)
            if match:
                break
        else:
            unexpected.append(f"unexpected key {key!r}")
            continue
        dest = match.expand(dst)
        if dest not in targets:
            unexpected.append(f"unexpected key {key!r} (the model has no parameter {dest!r})")
            continue
        index, count = part[0] if part else (None, 1)
        if dest in filled or index in parts.get(dest, {}):
            unexpected.append(f"key {key!r} fills {dest!r} a second time")
            continue
        path = targets[dest]
        try:
            value = fn(_to_numpy(state_dict[key]))
        except Exception as err:  # a damaged file can fail on any tensor; report it as a conversion problem
            raise ConversionError(f"cannot read tensor {key!r}: {type(err).__name__}: {err}") from err
        expected = tuple(flat[path].shape)
        if part:
            expected = (*expected[:-1], expected[-1] // count)
        if value.shape != expected:
            what = f"{dest!r} (part {index + 1} of {count})" if part else repr(dest)
            mismatched.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)} -> {what} {expected} expected"
            )
            if part:
                value = None  # kept as a placeholder: reported here, not again as a missing part
            else:
                filled[dest] = False  # reported as a mismatch, not again as missing
                continue
        if part:
            parts.setdefault(dest, {})[index] = value
            part_counts[dest] = count
            got = parts[dest]
            if len(got) < count or any(v is None for v in got.values()):
                continue
            value = np.concatenate([got[i] for i in range(count)], axis=-1)
            del parts[dest]
        filled[dest] = True
        flat[path] = jnp.asarray(value, dtype=flat[path].dtype)  # the model's storage dtype (param_dtype)
        del value
    missing = [
        f"missing key for part {i + 1} of {part_counts[dest]} of parameter {dest!r}"
        for dest, got in parts.items() for i in range(part_counts[dest]) if i not in got
    ]
    missing += [f"missing key for parameter {dest!r}" for dest in targets if dest not in filled and dest not in parts]
    problems = unexpected + mismatched + missing
    if problems:
        raise ConversionError(
            f"checkpoint does not match the {config.name!r} architecture ({len(problems)} problem(s))", problems
        )
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(flat))
    return nnx.merge(graphdef, state)
