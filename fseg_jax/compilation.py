"""How fseg_jax compiles its programs: XLA options per backend, and JAX's persistent compilation cache.

On CPU, XLA's own code (every fusion: softmax passes, GELU, LayerNorm, NMF updates) is generated for
256-bit vectors unless told otherwise, also on processors with 512-bit AVX-512 units. fseg_jax's programs
ask for 512-bit vectors (``xla_cpu_prefer_vector_width``); on processors without AVX-512 the compiler
keeps to the widest vectors they have, so the option is safe everywhere. Options are passed per program
(``jax.jit(..., compiler_options=...)``), never through ``XLA_FLAGS``, so they do not change anyone
else's programs in the process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for ``jax.jit(..., compiler_options=...)`` on ``backend`` (default: JAX's default)."""
    import jax

    backend = jax.default_backend() if backend is None else backend
    return dict(CPU_COMPILER_OPTIONS) if backend == "cpu" else {}


def jit(fun: Callable | None = None, **jit_kwargs):
    """``jax.jit`` with :func:`compiler_options`, usable as ``@jit`` or ``@jit(static_argnames=...)``.

    The jitted function is made on the first use, so importing a module that decorates with it does not
    start JAX's backend; attributes (``lower``, ``trace``, ...) are the jitted function's.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jitted(fun, jit_kwargs)


class _Jitted:
    def __init__(self, fun: Callable, jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._jit_kwargs = jit_kwargs
        self._jitted = None

    def _get(self):
        if self._jitted is None:
            import jax

            self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)
        return self._jitted

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._get(), name)


def enable_compilation_cache(directory: str | os.PathLike) -> None:
    """Turn on JAX's persistent compilation cache in ``directory``: a later process running the same
    programs (same shapes, same model architecture) loads them instead of compiling again."""
    import jax

    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.fspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
