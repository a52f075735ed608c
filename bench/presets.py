"""Seconds per 224 x 224 tile for the small presets: fseg_jax against the model's own framework, same run.

    python bench/presets.py                                   # the seven small presets, 8 tiles a call, best of 3
    python bench/presets.py --presets kaiko_vits16,hibou_b --batch 16 --repeats 5

Random weights, float32, CPU. The reference is the architecture in the framework its checkpoint ships for: timm
(eager, ``forward_intermediates`` of the last block) for the timm presets, transformers (eager, the full forward)
for ``phikon`` (``ViTModel``) and ``hibou_b`` (``Dinov2WithRegistersModel`` of Hibou's architecture: at 224 px its
stored 16 x 16 position grid is used as it is, so Hibou's own resampling code plays no part). fseg_jax runs
``forward_intermediates(x, indices=[-1])`` jitted with the package's compiler options; its compile time is printed
apart. One process runs all presets one after the other.
"""

from __future__ import annotations

import argparse
import time

from _common import best_time, host_description, test_helper

SMALL_PRESETS = ("kaiko_vits16", "kaiko_vits8", "kaiko_vitb16", "kaiko_vitb8", "lunit_vits8", "phikon", "hibou_b")


def _fseg_forward(preset: str, x_bhwc):
    import jax
    from flax import nnx

    from fseg_jax.compilation import compiler_options
    from fseg_jax.hub import random_model

    graphdef, state = nnx.split(random_model(preset))

    def features(state, x):
        return nnx.merge(graphdef, state).forward_intermediates(x, indices=[-1])[0]

    x = jax.device_put(x_bhwc)
    t0 = time.perf_counter()
    compiled = jax.jit(features, compiler_options=compiler_options()).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    return compile_s, lambda: compiled(state, x).block_until_ready()


def _reference_forward(preset: str, x_bhwc):
    """(framework name, a function running the reference forward once)."""
    import torch

    from fseg_jax.models.weights import read_manifest

    x = torch.from_numpy(x_bhwc.transpose(0, 3, 1, 2).copy())
    manifest = read_manifest(preset)
    if "timm" in manifest:
        model = test_helper("timm_models").make_timm_model(preset, perturb=False)

        def run():
            with torch.inference_mode():
                return model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0]

        return "timm", run
    from transformers import AutoConfig, AutoModel

    hf_config = dict(manifest["transformers"])
    if "auto_map" in hf_config:  # Hibou's custom-code Dinov2Model: transformers' DINOv2 with registers
        for key in ("auto_map", "interpolate_antialias", "interpolate_offset"):
            hf_config.pop(key)
        hf_config.update(model_type="dinov2_with_registers", architectures=["Dinov2WithRegistersModel"])
    model = AutoModel.from_config(AutoConfig.for_model(**hf_config)).eval()

    def run():
        with torch.inference_mode():
            return model(x).last_hidden_state

    return "transformers", run


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(SMALL_PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="tiles per forward call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first; the fastest counts")
    args = parser.parse_args()

    print(host_description())
    x = np.random.default_rng(0).standard_normal((args.batch, 224, 224, 3), dtype=np.float32)
    print(f"{'preset':14s} {'reference':13s} {'fseg_jax s/tile':>16s} {'reference s/tile':>17s} {'ratio':>6s} "
          f"{'compile s':>10s}")
    for preset in args.presets.split(","):
        compile_s, ours = _fseg_forward(preset, x)
        ours()
        ours_s, _ = best_time(ours, args.repeats)
        framework, reference = _reference_forward(preset, x)
        reference()
        ref_s, _ = best_time(reference, args.repeats)
        print(f"{preset:14s} {framework:13s} {ours_s / args.batch:16.4f} {ref_s / args.batch:17.4f} "
              f"{ours_s / ref_s:6.2f} {compile_s:10.1f}", flush=True)


if __name__ == "__main__":
    main()
