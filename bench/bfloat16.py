"""bfloat16 against float32 through ``fseg_jax.segment``: label agreement and time, same model, same run.

    python bench/bfloat16.py                 # example_3.jpg, UNI architecture (random weights, seed 0), upstream bank k = 16
    python bench/bfloat16.py --depth 4 --k 8

The image and the upstream UNI bank come from ../shared/data (a random image and bank where absent). The bfloat16
run computes the model in bfloat16 (parameters stored in bfloat16 compute the same, see tests/test_bfloat16.py);
the NNLS, upsampling and argmax run in float32 in both. Reported: the share of pixels whose label is the same, the
warm time of each, and their ratio.
"""

from __future__ import annotations

import argparse

from _common import SHARED_DATA, best_time, host_description

IMAGE = SHARED_DATA / "he" / "example_3.jpg"
UNI_BANK = SHARED_DATA / "concepts" / "uni.joblib"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: UNI's 24)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax.numpy as jnp
    import numpy as np

    from fseg_jax import segment
    from fseg_jax.hub import random_model
    from fseg_jax.io import read_image

    print(host_description())
    rng = np.random.default_rng(0)
    image = read_image(IMAGE) if IMAGE.is_file() else rng.integers(0, 256, (975, 1270, 3), dtype=np.uint8)
    if UNI_BANK.is_file():
        from fseg_jax.concepts import import_joblib_concepts

        concepts, source = np.asarray(import_joblib_concepts(UNI_BANK, trust_pickle=True)[args.k]), "upstream UNI bank"
    else:
        concepts, source = rng.uniform(0, 1, (args.k, 1024)).astype(np.float32), "random bank"
    model = random_model("uni", seed=0, depth=args.depth)
    print(f"image {image.shape[1]}x{image.shape[0]}, {source} k={args.k}, UNI depth {model.config.depth} (random weights)")

    results = {}
    for name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
        segment(image, concepts, model=model, dtype=dtype)  # compile
        seconds, labels = best_time(lambda: segment(image, concepts, model=model, dtype=dtype), args.repeats)
        results[name] = (seconds, labels)
        print(f"  {name:8s} warm {seconds:.2f} s")
    (t32, l32), (t16, l16) = results["float32"], results["bfloat16"]
    print(f"  bfloat16 / float32 time {t16 / t32:.2f}; labels agreeing {np.mean(l32 == l16):.2%} of "
          f"{l32.size} pixels")


if __name__ == "__main__":
    main()
