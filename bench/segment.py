"""End-to-end segmentation benchmark: fseg_jax against the original F-Seg pipeline, same model, same run.

    python bench/segment.py                      # example_3.jpg (1270x975), UNI architecture, k = 64, CPU
    python bench/segment.py --depth 4 --k 16     # a quick smoke run

Both pipelines run the same random-weight UNI-architecture model (timm, converted to fseg_jax) on the same
image with the same concept bank (the upstream UNI bank from ../shared/data/concepts/uni.joblib when present,
else a random non-negative one) in "project" mode. Reported:

- the original (timm + scikit-learn + torch, ``tests/segment_original.py``): ViT forward, NNLS, bilinear
  upsampling + argmax, total;
- fseg_jax: the first call in this process (trace, compile and run; no persistent cache), the warm
  end-to-end call, the warm ViT forward alone (the same jitted forward as the pipeline uses) and the warm
  post-ViT program alone (NNLS, upsampling, argmax on the same features);
- in new processes, the time to trace and lower the pipeline's program and to compile it with JAX's
  persistent compilation cache (as the CLI enables it) in an empty folder, then with that folder filled;
- the ratios the targets are stated in, and the share of pixels on which both pipelines agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import SHARED_DATA, best_time, host_description, test_helper

IMAGE = SHARED_DATA / "he" / "example_3.jpg"
UNI_BANK = SHARED_DATA / "concepts" / "uni.joblib"


def _image():
    import numpy as np

    from fseg_jax.io import read_image

    if IMAGE.is_file():
        return read_image(IMAGE)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (975, 1270, 3), dtype=np.uint8)


def _concepts(k: int, dim: int):
    import numpy as np

    if UNI_BANK.is_file() and dim == 1024:
        from fseg_jax.concepts import import_joblib_concepts

        bank = import_joblib_concepts(UNI_BANK, trust_pickle=True)  # the pinned upstream file
        if k in bank.ks:
            return np.asarray(bank[k]), "upstream UNI bank"
    return np.abs(np.random.default_rng(0).standard_normal((k, dim))).astype(np.float32), "random bank"


def _model(depth: int | None):
    from fseg_jax.convert.timm import convert_timm_state_dict

    timm_models = test_helper("timm_models")
    timm_model = timm_models.make_timm_model("uni", depth=depth)
    return timm_model, convert_timm_state_dict(timm_model.state_dict(), timm_models.fseg_config("uni", depth))


def _project_program(model, concepts):
    """The options and clipped concepts of ``segment(..., method="project")``'s jitted program."""
    from fseg_jax.segmentation import Pipeline

    pipeline = Pipeline.create(concepts, model=model, method="project")
    return pipeline.options, pipeline.program_concepts


def compile_times(args) -> dict:
    """Trace + lower, then compile (or load from the persistent cache in ``args.cache``), the pipeline's program
    for the benchmark image, as the first ``segment()`` call of a new process does."""
    from fseg_jax.compilation import enable_compilation_cache

    enable_compilation_cache(args.cache)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fseg_jax.segmentation import segment_padded

    _, model = _model(args.depth)
    image = _image()
    options, concepts = _project_program(model, _concepts(args.k, model.config.embed_dim)[0])
    graphdef, state = nnx.split(model)
    h, w = image.shape[:2]
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16
    batch = jnp.asarray(np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge"))[None]
    trace_s, lowered = best_time(lambda: segment_padded.lower(graphdef, options, state, jnp.asarray(concepts), batch))
    compile_s, _ = best_time(lowered.compile)
    return {"trace_lower_s": trace_s, "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: UNI's 24)")
    parser.add_argument("--repeats", type=int, default=2, help="warm repeats (best is reported)")
    parser.add_argument("--skip-original", action="store_true")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.compile_only:
        print(json.dumps(compile_times(args)))
        return

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from fseg_jax.compilation import jit
    from fseg_jax.features import preprocess, token_features
    from fseg_jax.segmentation import segment, token_weights
    from fseg_jax.upsample import upsample_argmax

    original = test_helper("segment_original")

    print(host_description())
    timm_model, model = _model(args.depth)
    image = _image()
    concepts, bank_name = _concepts(args.k, model.config.embed_dim)
    h, w = image.shape[:2]
    results: dict = {
        "image": f"{w}x{h}", "k": args.k, "depth": model.config.depth, "bank": bank_name,
        "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
    }

    # fseg_jax: first call (compile + run), then warm
    results["jax_first_call_s"], labels = best_time(lambda: segment(image, concepts, model=model))
    results["jax_warm_s"], labels = best_time(lambda: segment(image, concepts, model=model), args.repeats)

    # the same jitted pieces, timed apart: the ViT forward, and everything after it
    graphdef, state = nnx.split(model)
    hp, wp = -(-h // 16) * 16, -(-w // 16) * 16
    padded = jnp.asarray(np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), mode="edge"))[None]

    @jit
    def forward(state, images):
        m = nnx.merge(graphdef, state)
        return token_features(m, preprocess(images, m.config), [-1])

    options, clipped = _project_program(model, concepts)

    @jit
    def after_vit(feats_bhwd, concepts_kd):
        def one(f):
            weights, _, _ = token_weights(f, concepts_kd, options)
            return upsample_argmax(weights, (hp, wp))

        return jax.vmap(one)(feats_bhwd)

    feats = jax.block_until_ready(forward(state, padded))
    c = jnp.asarray(clipped)
    jax.block_until_ready(after_vit(feats, c))
    results["jax_forward_s"], _ = best_time(lambda: jax.block_until_ready(forward(state, padded)), args.repeats)
    results["jax_after_vit_s"], _ = best_time(lambda: jax.block_until_ready(after_vit(feats, c)), args.repeats)

    # new processes: compile the pipeline with JAX's persistent compilation cache (as the CLI enables it) in an
    # empty folder, then again in a second process with the folder filled
    cache = args.cache or tempfile.mkdtemp(prefix="fseg_jax_bench_cache_")
    for label in ("empty_cache", "filled_cache"):
        child = subprocess.run(
            [sys.executable, __file__, "--compile-only", "--cache", cache, "--k", str(args.k)]
            + (["--depth", str(args.depth)] if args.depth else []),
            capture_output=True, text=True, check=True,
        )
        for key, value in json.loads(child.stdout.strip().splitlines()[-1]).items():
            results[f"jax_new_process_{label}_{key}"] = value
    results["compilation_cache_files"] = len(os.listdir(cache))

    if not args.skip_original:
        fseg = original.OriginalFSeg(timm_model)
        x = original.input_tensor(image)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = fseg.project(x, concepts.copy())[:h, :w]
        results["original_total_s"] = time.perf_counter() - t0
        results["original_forward_s"] = fseg.timings["forward"]
        results["original_nnls_s"] = fseg.timings["nnls"]
        results["original_upsample_argmax_s"] = fseg.timings["upsample_argmax"]
        results["original_after_vit_s"] = results["original_total_s"] - results["original_forward_s"]
        results["agreement"] = float((np.asarray(labels) == ref).mean())
        results["after_vit_speedup"] = results["original_after_vit_s"] / results["jax_after_vit_s"]
        results["end_to_end_ratio_warm"] = results["jax_warm_s"] / results["original_total_s"]
        results["end_to_end_ratio_first_call"] = results["jax_first_call_s"] / results["original_total_s"]
        results["forward_ratio"] = results["jax_forward_s"] / results["original_forward_s"]

    for key, value in results.items():
        print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
