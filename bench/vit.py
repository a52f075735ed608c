"""ViT forward benchmark: fseg_jax against timm, same architecture, same run, random weights.

    python bench/vit.py                                   # UNI (ViT-L/16), float32, CPU: 8x224x224 and 1x976x1280
    python bench/vit.py --shapes 8x224x224 --repeats 3
    python bench/vit.py --dtype bfloat16 --shapes 64x224x224,256x224x224,1x976x1280 --frameworks jax  # GPU
    python bench/vit.py --preset gigapath --dtype bfloat16 --param-dtype bfloat16 --shapes 1x224x224 --frameworks jax
    python bench/vit.py --frameworks jax,timm,timm-compile --attention batched --precision default  # TF32 on GPU

Frameworks: ``jax`` (fseg_jax, compiled with the package's XLA options), ``jax-float32`` (fseg_jax in float32
whatever ``--dtype`` says: the reference of the bfloat16 speed-up), ``timm`` (eager, SDPA attention) and
``timm-compile`` (the same model through ``torch.compile``). In bfloat16, timm runs the model converted with
``model.to(torch.bfloat16)`` on bfloat16 inputs (faster than autocast on CPU), fseg_jax with ``dtype=bfloat16`` and
parameters stored in ``--param-dtype`` (by default in the compute dtype, as timm's converted model and as
``--dtype bfloat16`` stores them on the command line).

Each (framework, shape) runs in its own process so that peak memory (VmHWM) is its own. Reported per run:
compile time (jax: lower + compile; timm: the first call), the best forward time of ``--repeats`` after it,
tiles per second, and peak resident memory during the timed forwards (the peak is reset after compilation,
which is reported separately) with its increase over the loaded model and input. On a GPU
the peak is the device allocator's (jax: ``peak_bytes_in_use``; torch: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import ROOT, host_description, test_helper


def _reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: clear_refs 5), so a peak is one phase's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _host_memory(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _timed_calls(run, repeats: int) -> tuple[list[float], int]:
    """Seconds of each of ``repeats`` calls of ``run``, and the resident memory before them (the peak is
    reset first, so that VmHWM afterwards is the timed calls' own)."""
    _reset_peak()
    before = _host_memory("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times, before


def _host_peaks(before: int, first_peak: int) -> dict:
    """Host memory figures in MB: peak of the timed calls, its increase over ``before``, and the peak of the
    compilation or first call."""
    peak = _host_memory("VmHWM")
    return {"peak_mb": peak / 1e6, "added_mb": (peak - before) / 1e6, "compile_peak_mb": first_peak / 1e6}


def _run_jax(preset: str, depth: int | None, shape: tuple[int, int, int], dtype: str, repeats: int,
             attention: str = "auto", precision: str = "highest", param_dtype: str = "float32") -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fseg_jax import ViTConfig, VisionTransformer
    from fseg_jax.compilation import compiler_options

    config = ViTConfig.from_preset(preset)
    if depth is not None:
        config = dataclasses.replace(config, depth=depth)
    compute = {"float32": None, "bfloat16": jnp.bfloat16}[dtype]
    model = VisionTransformer(config, rngs=nnx.Rngs(0), dtype=compute, param_dtype=jnp.dtype(param_dtype),
                              attention_impl=attention, precision=precision)
    graphdef, state = nnx.split(model)
    del model

    def features(state, x):
        return nnx.merge(graphdef, state).forward_intermediates(x, indices=[-1])[0]

    b, h, w = shape
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, h, w, 3), dtype=np.float32))
    jax.block_until_ready((state, x))
    t0 = time.perf_counter()
    compiled = jax.jit(features, compiler_options=compiler_options()).lower(state, x).compile()
    compile_s = time.perf_counter() - t0
    compile_peak = _host_memory("VmHWM")
    times, before = _timed_calls(lambda: compiled(state, x).block_until_ready(), repeats)
    device = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device": device.device_kind}
    if jax.default_backend() == "gpu":
        stats = device.memory_stats() or {}
        out["peak_mb"] = stats.get("peak_bytes_in_use", 0) / 1e6
        out["added_mb"] = None
    else:
        out.update(_host_peaks(before, compile_peak))
    return {**out, "compile_s": compile_s, "forward_s": min(times), "times": times}


def _run_timm(preset: str, depth: int | None, shape: tuple[int, int, int], dtype: str, repeats: int,
              compile_model: bool = False) -> dict:
    import torch

    make_timm_model = test_helper("timm_models").make_timm_model
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = make_timm_model(preset, depth=depth, perturb=False).to(device=device, dtype=torch_dtype)
    forward = model.forward_intermediates
    if compile_model:
        forward = torch.compile(forward)
    b, h, w = shape
    x = torch.randn(b, 3, h, w, device=device, dtype=torch_dtype)

    def run():
        with torch.inference_mode():
            y = forward(x, indices=[-1], intermediates_only=True)[0]
        if cuda:
            torch.cuda.synchronize()
        return y

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    first_peak = _host_memory("VmHWM")
    times, before = _timed_calls(run, repeats)
    out = {"backend": device, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "threads": torch.get_num_threads()}
    if cuda:
        out["peak_mb"], out["added_mb"] = torch.cuda.max_memory_allocated() / 1e6, None
    else:
        out.update(_host_peaks(before, first_peak))
    return {**out, "compile_s": compile_s, "forward_s": min(times), "times": times}


def _child(args) -> None:
    shape = tuple(int(v) for v in args.child_shape.split("x"))
    common = (args.preset, args.depth, shape, args.dtype, args.repeats)
    if args.child == "jax":
        result = _run_jax(*common, attention=args.attention, precision=args.precision, param_dtype=args.param_dtype)
    elif args.child == "jax-float32":  # fseg_jax's own float32 forward, the reference of a bfloat16 run
        result = _run_jax(args.preset, args.depth, shape, "float32", args.repeats, attention=args.attention,
                          precision=args.precision)
    else:
        result = _run_timm(*common, compile_model=args.child == "timm-compile")
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="uni")
    parser.add_argument("--depth", type=int, default=None, help="reduce the depth (default: the preset's)")
    parser.add_argument("--shapes", default="8x224x224,1x976x1280", help="comma-separated BxHxW")
    parser.add_argument("--frameworks", default="jax,timm")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--param-dtype", default=None, choices=["float32", "bfloat16"],
                        help="fseg_jax's storage dtype of the weights (default: --dtype)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--attention", default="auto", help="fseg_jax attention implementation (default: auto)")
    parser.add_argument("--precision", default="highest", help="fseg_jax float32 matmul precision")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.param_dtype = args.param_dtype or args.dtype
    if args.child:
        _child(args)
        return

    print(host_description())
    results = []
    for shape in args.shapes.split(","):
        row = {"shape": shape}
        for framework in args.frameworks.split(","):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--child-shape", shape,
                   "--preset", args.preset, "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--attention", args.attention, "--precision", args.precision, "--param-dtype", args.param_dtype]
            if args.depth is not None:
                cmd += ["--depth", str(args.depth)]
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"{framework} {shape} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row[framework] = json.loads(lines[-1][len("RESULT "):])
        results.append(row)
        _print_row(row, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "depth": args.depth, "dtype": args.dtype, "results": results}, f,
                      indent=2)


def _print_row(row: dict, args) -> None:
    b = int(row["shape"].split("x")[0])
    print(f"== {args.preset} depth={args.depth or 'full'} {args.dtype} {row['shape']} "
          f"(fseg_jax attention {args.attention}, precision {args.precision})")
    for framework in ("jax", "jax-float32", "timm", "timm-compile"):
        r = row.get(framework)
        if r is None:
            continue
        added = "" if r["added_mb"] is None else (
            f" (+{r['added_mb']:.0f} MB over the model; peak during compile/first call {r['compile_peak_mb']:.0f} MB)")
        print(f"  {framework:12s} [{r['backend']} {r['device']}] forward {r['forward_s']:.3f} s "
              f"({b / r['forward_s']:.1f} tiles/s), compile/first call {r['compile_s']:.1f} s, "
              f"peak {r['peak_mb']:.0f} MB{added}")
    for reference in ("jax-float32", "timm", "timm-compile"):
        if "jax" in row and reference in row:
            j, t = row["jax"], row[reference]
            print(f"  ratio fseg_jax/{reference}: forward {j['forward_s'] / t['forward_s']:.2f}, "
                  f"peak memory {j['peak_mb'] / t['peak_mb']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
