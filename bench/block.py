"""Where one ViT block's time goes: each part of a UNI block jitted and timed alone, in float32 and bfloat16.

    python bench/block.py                      # 8 tiles of 224 px (197 tokens each) and one 976x1280 image
    python bench/block.py --shapes 8x197 --preset gigapath

Parts: the two LayerNorms, the qkv / projection / fc1 / fc2 matmuls (with their bias and cast), the attention
formulation "auto" picks on this machine, and the activation; each is timed on inputs of the dtype it receives in
the block, best of ``--repeats``, with the parameters passed in as arguments (float32, cast on every call, as in
the model's forward). The matmuls' GFLOP/s are printed beside their times, and the whole block's time
beside the sum of its parts.
"""

from __future__ import annotations

import argparse
import dataclasses

from _common import best_time, host_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="uni")
    parser.add_argument("--shapes", default="8x197,1x4881", help="comma-separated BATCHxTOKENS")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fseg_jax import ViTConfig, VisionTransformer
    from fseg_jax.compilation import compiler_options
    from fseg_jax.models.attention import attention

    print(host_description())
    config = dataclasses.replace(ViTConfig.from_preset(args.preset), depth=1)
    d, heads = config.embed_dim, config.num_heads
    for shape in args.shapes.split(","):
        b, n = (int(v) for v in shape.split("x"))
        for dtype in (None, jnp.bfloat16):
            block = VisionTransformer(config, rngs=nnx.Rngs(0), dtype=dtype).blocks[0]
            graphdef, state = nnx.split(block)
            compute = dtype or jnp.float32
            x = jnp.asarray(np.random.default_rng(0).standard_normal((b, n, d), dtype=np.float32))
            rows = []

            def timed(name, fn, *inputs, flops=None):
                """Time fn(block, *inputs), the block's parameters passed as an argument."""
                jitted = jax.jit(lambda state, *a: fn(nnx.merge(graphdef, state), *a),
                                 compiler_options=compiler_options())
                out = jitted(state, *inputs)
                jax.block_until_ready(out)
                seconds, _ = best_time(lambda: jax.block_until_ready(jitted(state, *inputs)), args.repeats)
                rows.append((name, seconds, flops))
                return out

            normed = timed("norm1", lambda blk, x: blk.norm1(x), x)
            qkv = timed("qkv", lambda blk, x: blk.attn.qkv(x), normed, flops=2 * b * n * d * 3 * d)
            q = qkv.reshape(b, n, 3, heads, d // heads)
            attended = timed("attention", lambda blk, q: attention(q[:, :, 0], q[:, :, 1], q[:, :, 2]), q,
                             flops=4 * b * n * n * d)
            timed("proj", lambda blk, a: blk.attn.proj(a), attended.reshape(b, n, d), flops=2 * b * n * d * d)
            timed("norm2", lambda blk, x: blk.norm2(x), x)
            hidden = timed("fc1", lambda blk, x: blk.mlp.fc1(x), normed, flops=2 * b * n * d * config.mlp_hidden)
            if block.mlp.packed:
                act = timed("activation", lambda blk, h: (lambda a, g: blk.mlp._activation(a) * g)(
                    *jnp.split(h, 2, -1)), hidden)
            else:
                act = timed("activation", lambda blk, h: blk.mlp._activation(h), hidden)
            timed("fc2", lambda blk, h: blk.mlp.fc2(h), act.astype(compute), flops=2 * b * n * act.shape[-1] * d)
            timed("block", lambda blk, x: blk(x), x)
            whole = rows.pop()[1]  # the whole block, printed apart from its parts
            print(f"== {args.preset} block, {b} x {n} tokens, {jnp.dtype(compute).name}")
            for name, seconds, flops in rows:
                rate = f"  {flops / seconds / 1e9:6.0f} GFLOP/s" if flops else ""
                print(f"  {name:10s} {seconds * 1e3:8.1f} ms{rate}")
            matmuls = sum(s for name, s, _ in rows if name in ("qkv", "proj", "fc1", "fc2"))
            print(f"  matmuls {matmuls * 1e3:.1f} ms, attention {rows[2][1] * 1e3:.1f} ms, the rest "
                  f"{(sum(s for _, s, _ in rows) - matmuls - rows[2][1]) * 1e3:.1f} ms; sum of parts "
                  f"{sum(s for _, s, _ in rows) * 1e3:.1f} ms, whole block {whole * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
