"""The concept atlas of the example slide, timed against segmenting the same slide in the same run.

    python bench/atlas.py                       # UNI architecture cut to 4 blocks, random weights, k = 16
    python bench/atlas.py --depth 24 --k 64

Both read ../shared/data/he/cmu_small_region.svs at 0.5 um/px in tissue tiles of --tile pixels and run the
same model and bank (the upstream UNI bank where ../shared/data holds it, else a seeded random one); the
atlas keeps the 8 strongest 64 px patches per concept. The atlas does the slide's forward and projection and
no label map, so its time should stay near the segmentation's: printed as the ratio atlas / segment_slide.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
from _common import SHARED_DATA, host_description

SLIDE = SHARED_DATA / "he" / "cmu_small_region.svs"
UNI_BANK = SHARED_DATA / "concepts" / "uni.joblib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tile", type=int, default=512)
    args = parser.parse_args()
    if not SLIDE.is_file():
        raise SystemExit(f"{SLIDE} is missing: this benchmark needs the example slide of ../shared/data")

    from flax import nnx

    from fseg_jax import ViTConfig, VisionTransformer, segment_slide
    from fseg_jax.atlas import concept_atlas, save_atlas
    from fseg_jax.concepts import import_joblib_concepts

    print(host_description())
    config = dataclasses.replace(ViTConfig.from_preset("uni"), depth=args.depth)
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    if UNI_BANK.is_file():
        bank = import_joblib_concepts(UNI_BANK, trust_pickle=True)[args.k]
    else:
        bank = np.abs(np.random.default_rng(0).normal(size=(args.k, config.embed_dim))).astype(np.float32)
    settings = {"mpp": 0.5, "tile": args.tile}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = segment_slide(SLIDE, f"{tmp}/slide", model=model, concepts=bank, **settings)
        segment_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        atlas = concept_atlas([SLIDE], bank, model=model, n=8, patch=64, **settings)
        save_atlas(f"{tmp}/atlas.png", atlas)
        atlas_s = time.perf_counter() - t0
    print(f"UNI architecture, {args.depth} blocks, random weights, k={args.k}, tile {args.tile}: "
          f"{result.summary['tiles']['tissue']} tissue tiles, {atlas.tokens} tissue tokens")
    print(f"atlas {atlas_s:.1f} s, segment_slide {segment_s:.1f} s (both compile once): ratio {atlas_s / segment_s:.2f}")


if __name__ == "__main__":
    main()
