"""Building a concept bank for a small model: ``fseg_jax.build_concepts`` timed, its k-means against scikit-learn's.

    python bench/concepts.py                                  # kaiko_vits16, random weights, k = 8, 16, 32, 64
    python bench/concepts.py --preset lunit_vits8 --crops 12 --tokens-per-tile 128

The image folder is ``--crops`` crops of ``--crop`` px cut from example_3.jpg (``../shared/data/he``) on a regular
grid, written as PNG files to a temporary folder; each crop gives (crop // 224)^2 tiles of 224 px. The bank is built
per token (``per_token=True``, ``--tokens-per-tile`` tokens drawn from each tile), since a handful of images has
too few tiles for k = 64 centres of tile means. Printed: the feature pass, each k's k-means in fseg_jax (first call,
which compiles, and a second one) against scikit-learn's ``KMeans`` (Lloyd, k-means++, the same ``n_init``,
``max_iter`` and ``tol``) on the same features in the same run, with the ratio of their inertias, and the whole
``build_concepts`` call.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import SHARED_DATA, best_time, host_description


def write_crops(image_path: Path, folder: Path, count: int, size: int) -> list[Path]:
    """``count`` crops of ``size`` px from a regular grid over the image, as PNG files in ``folder``."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(image_path).convert("RGB"))
    h, w = image.shape[:2]
    side = int(np.ceil(np.sqrt(count)))
    ys = np.linspace(0, h - size, side).astype(int)
    xs = np.linspace(0, w - size, side).astype(int)
    paths = []
    for i, (y, x) in enumerate([(y, x) for y in ys for x in xs][:count]):
        path = folder / f"crop_{i:03d}.png"
        Image.fromarray(image[y : y + size, x : x + size]).save(path)
        paths.append(path)
    return paths


def main() -> None:
    from sklearn.cluster import KMeans

    import fseg_jax
    from fseg_jax.concepts.build import collect_features
    from fseg_jax.hub import random_model
    from fseg_jax.kmeans import kmeans

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="kaiko_vits16")
    parser.add_argument("--ks", default="8,16,32,64")
    parser.add_argument("--crops", type=int, default=9)
    parser.add_argument("--crop", type=int, default=448)
    parser.add_argument("--tokens-per-tile", type=int, default=64)
    parser.add_argument("--n-init", type=int, default=3)
    parser.add_argument("--image", default=str(SHARED_DATA / "he" / "example_3.jpg"))
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    settings = dict(n_init=args.n_init, max_iter=300, tol=1e-4)

    print(host_description())
    model = random_model(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_crops(Path(args.image), folder, args.crops, args.crop)
        options = dict(per_token=True, tokens_per_tile=args.tokens_per_tile, seed=0)
        t0 = time.perf_counter()
        _, _, x_nd = collect_features(model, folder, at_least=max(ks), **options)
        features_s = time.perf_counter() - t0
        print(f"{args.preset} (random weights): {args.crops} crops of {args.crop} px -> {x_nd.shape[0]} tokens of "
              f"{x_nd.shape[1]} values; feature pass {features_s:.1f} s (first call, compiling)")
        print(f"{'k':>4s} {'fseg_jax first s':>17s} {'fseg_jax s':>11s} {'sklearn s':>10s} {'ratio':>6s} "
              f"{'inertia fseg/sklearn':>21s}")
        for k in ks:
            t0 = time.perf_counter()
            kmeans(x_nd, k, seed=0, **settings)
            first_s = time.perf_counter() - t0
            ours_s, ours = best_time(lambda k=k: kmeans(x_nd, k, seed=0, **settings))
            ref_s, ref = best_time(lambda k=k: KMeans(k, init="k-means++", algorithm="lloyd", random_state=0,
                                                      **settings).fit(x_nd))
            print(f"{k:4d} {first_s:17.2f} {ours_s:11.2f} {ref_s:10.2f} {ours_s / ref_s:6.2f} "
                  f"{ours.inertia / ref.inertia_:21.4f}", flush=True)
        t0 = time.perf_counter()
        bank = fseg_jax.build_concepts(model, folder, ks=ks, **options, **settings)
        print(f"build_concepts(ks={tuple(ks)}) end to end: {time.perf_counter() - t0:.1f} s "
              f"(banks {', '.join(f'{k}: {bank[k].shape}' for k in bank.ks)})")


if __name__ == "__main__":
    main()
