"""Roofline of the ViT forward: FLOPs per tile from the lowered program against the analytic count, and the tiles/s
that accelerators would give at a fraction of their bfloat16 peak.

    python bench/roofline.py                          # UNI and GigaPath, 224 and 1024 px tiles, 50% of peak
    python bench/roofline.py --presets uni --sizes 1024 --efficiency 0.4

The program is lowered with abstract parameters (nothing is allocated) and XLA's cost analysis counts its FLOPs.
Attention is lowered as one XLA softmax product (``attention_impl="xla"``): the chunked and splash formulations put
the products inside loops or kernels, whose FLOPs the cost analysis does not see. The analytic count is the
matmuls: patch embedding 2 N 3p^2 D, per block qkv 6 T D^2, projection 2 T D^2, MLP 2 T D (h1 + h2) (fc1 to h1,
fc2 from h2), attention products 4 T^2 D, for N patch and T = N + prefix tokens; elementwise work is left out.
"""

from __future__ import annotations

import argparse

# dense bfloat16 peak per chip, TFLOP/s (vendors' data sheets; no sparsity)
PEAKS = {"TPU v5e": 197, "TPU v5p": 459, "TPU v6e": 918, "H100 SXM": 989, "H200": 989}


def analytic_flops(config, size: int) -> float:
    n = (size // config.patch_size) ** 2
    t = n + config.num_prefix_tokens
    d = config.embed_dim
    fc2_in = config.mlp_hidden // 2 if config.mlp_layer == "swiglu_packed" else config.mlp_hidden
    per_block = 6 * t * d * d + 2 * t * d * d + 2 * t * d * (config.mlp_hidden + fc2_in) + 4 * t * t * d
    return 2 * n * 3 * config.patch_size**2 * d + config.depth * per_block


def lowered_flops(config, size: int) -> float:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fseg_jax import VisionTransformer

    model = nnx.eval_shape(lambda: VisionTransformer(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                     param_dtype=jnp.bfloat16, attention_impl="xla"))
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state).forward_intermediates(x, indices=[-1])[0]

    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    cost = jax.jit(forward).lower(state, x).cost_analysis()
    return float(cost["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["uni", "gigapath"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 1024])
    parser.add_argument("--efficiency", type=float, default=0.5, help="fraction of the bfloat16 peak assumed")
    args = parser.parse_args()

    from fseg_jax.models.config import ViTConfig

    print(f"tiles/s at {args.efficiency:.0%} of the dense bfloat16 peak: " +
          ", ".join(f"{name} {peak} TFLOP/s" for name, peak in PEAKS.items()))
    print("| preset | tile | GFLOP per tile, lowered | analytic | lowered / analytic | " +
          " | ".join(PEAKS) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in PEAKS) + " |")
    for preset in args.presets:
        config = ViTConfig.from_preset(preset)
        for size in args.sizes:
            lowered, analytic = lowered_flops(config, size), analytic_flops(config, size)
            rates = [f"{args.efficiency * peak * 1e12 / lowered:,.0f}" for peak in PEAKS.values()]
            print(f"| {preset} | {size} | {lowered / 1e9:,.1f} | {analytic / 1e9:,.1f} | {lowered / analytic:.3f} | "
                  + " | ".join(rates) + " |")


if __name__ == "__main__":
    main()
