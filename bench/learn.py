"""Concept banks learned for NNLS projection against k-means banks of the same k, from the same tokens.

    python bench/learn.py                       # UNI architecture cut to 4 blocks, random weights, k = 8, 16, 64
    python bench/learn.py --depth 24 --ks 8,16

Tokens: every last-block token of 224 px tiles of the packaged H&E sample and, where ../shared/data is
present, example_3.jpg; a seeded 80% / 20% split of the tiles into training and held-out tokens. Both banks
are built from the training tokens (k-means: ``fseg_jax.build_concepts``' algorithm, n_init 3; learned:
``fseg_jax.learning.learn_dictionary`` from k-means++ seeds). Printed per k: the time to build each and the
relative reconstruction error ||X - W C||^2 / ||X||^2 of NNLS projection of the held-out tokens onto each.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
import numpy as np
from _common import SHARED_DATA, host_description

EXAMPLE = SHARED_DATA / "he" / "example_3.jpg"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--ks", default="8,16,64")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()

    from flax import nnx

    from fseg_jax import ViTConfig, VisionTransformer
    from fseg_jax.concepts import collect_features
    from fseg_jax.data import sample_image
    from fseg_jax.kmeans import kmeans
    from fseg_jax.learning import learn_dictionary, relative_error

    print(host_description())
    config = dataclasses.replace(ViTConfig.from_preset("uni"), depth=args.depth)
    model = VisionTransformer(config, rngs=nnx.Rngs(0))
    images = [sample_image()] + ([str(EXAMPLE)] if EXAMPLE.is_file() else [])
    _, _, x = collect_features(model, images, per_token=True, tile=224)
    tiles = x.reshape(-1, 14 * 14, x.shape[-1])
    held = np.random.default_rng(0).random(len(tiles)) < 0.2
    train, test = tiles[~held].reshape(-1, x.shape[-1]), tiles[held].reshape(-1, x.shape[-1])
    print(f"UNI architecture, {args.depth} blocks, random weights: {len(train)} training and {len(test)} held-out "
          f"tokens from {len(images)} image(s)")
    for k in (int(v) for v in args.ks.split(",")):
        t0 = time.perf_counter()
        centres = kmeans(train, k, seed=0).centers
        kmeans_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        learned = learn_dictionary(train, k, steps=args.steps, batch_tokens=args.batch_tokens, seed=0).concepts
        learn_s = time.perf_counter() - t0
        e_k, e_l = relative_error(test, centres), relative_error(test, learned)
        print(f"k={k:3d}: held-out relative error k-means {e_k:.4f}, learned {e_l:.4f} (ratio {e_l / e_k:.2f}); "
              f"build k-means {kmeans_s:.1f} s, learned {learn_s:.1f} s")


if __name__ == "__main__":
    main()
