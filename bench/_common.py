"""What the benchmark scripts share: the shared data folder, the host they run on, a timer, and the reference code
they time against.

The reference F-Seg pipeline (``tests/segment_original.py``) and the random timm models of the released
architectures (``tests/timm_models.py``) are test helpers, checked by the tests that use them. The benchmarks time
that same reference rather than keep a second copy, and :func:`test_helper` is the one place that reaches into
``tests/`` for it: it loads the file by path, so neither ``sys.path`` nor the tests change for the benchmarks, and
the tests never import from ``bench/``.

Each script imports this module as ``_common`` (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # real files beside the clone, when present (../shared/data)


@functools.cache
def test_helper(name: str) -> ModuleType:
    """The module ``tests/<name>.py`` (``"segment_original"``, ``"timm_models"``), loaded from its file once."""
    spec = importlib.util.spec_from_file_location(f"fseg_jax_tests_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def best_time(fn, repeats: int = 1):
    """(fastest of ``repeats`` calls of ``fn`` in seconds, the last call's result); ``fn`` must block until done."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def host_description() -> str:
    """The CPU (lscpu's model name, its vector extensions, caches) and the attention blocks chosen for it."""
    from fseg_jax.models.attention import cpu_block_elements, last_level_cache_bytes

    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except OSError:
        pass
    flags = [f for f in info.get("Flags", "").split() if f.startswith(("avx", "amx", "fma"))]
    return (f"host: {info.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, vector flags {' '.join(flags)}; "
            f"last-level cache {last_level_cache_bytes() / 2**20:.0f} MiB -> CPU attention score blocks of "
            f"{cpu_block_elements() / 2**20:.1f} M float32 values")
