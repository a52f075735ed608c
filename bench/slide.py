"""Whole-slide throughput: fseg_jax's slide pipeline against a PyTorch loop doing the same work.

CPU (default): the UNI architecture (ViT-L/16, random timm weights converted, the same in both) on the tissue tiles
of a real SVS, read with the same reader and tile grid: fseg_jax's compiled tile step against a PyTorch loop
(timm forward -> ReLU'd last-block tokens -> NNLS onto the concepts with scikit-learn's solver, as the
original F-Seg does -> argmax), timed tile by tile in alternation (the shared machine's load drifts); then
the whole `SlideSegmenter` pipeline end to end (threaded prefetch, one compiled step) with the share of time
spent reading vs computing.

GPU (--gpu): steady-state tiles/s of the compiled step (synthetic batches), tiles/s of reading real tiles
with the thread pool, an end-to-end run on the SVS, and the estimated minutes for a 100k x 80k px slide
at the working resolution.

    python bench/slide.py                        # CPU comparison, 512 px tiles at 1 um/px
    python bench/slide.py --gpu --dtype bfloat16 --tile 1024 --batch 16
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED_DATA

SVS = SHARED_DATA / "he" / "cmu_small_region.svs"
UNI_BANK = SHARED_DATA / "concepts" / "uni.joblib"


def concepts_for(k: int, dim: int, bank: Path = UNI_BANK) -> np.ndarray:
    """The upstream UNI bank's k concepts when the file is there, else random non-negative ones."""
    if bank.is_file() and dim == 1024:
        from fseg_jax.concepts import import_joblib_concepts

        return np.asarray(import_joblib_concepts(bank, trust_pickle=True, model="uni")[k])
    return np.abs(np.random.default_rng(0).normal(size=(k, dim))).astype(np.float32)


def tissue_tiles(slide, grid):
    """The pipeline's choice of tiles: the tiles whose core holds tissue."""
    from fseg_jax.wsi.tissue import detect_tissue

    _, tissue_tokens = detect_tissue(slide, size=(grid.width, grid.height), patch=grid.patch)
    return grid.tiles_with(tissue_tokens)


def uni_config(args):
    from fseg_jax import ViTConfig

    cfg = ViTConfig.from_preset("uni")
    return dataclasses.replace(cfg, depth=args.depth) if args.depth else cfg


def build_jax(args, k, torch_model=None):
    """The slide segmenter for UNI's architecture: random weights, or a timm model's converted."""
    import flax.nnx as nnx

    from fseg_jax import VisionTransformer, convert_timm_state_dict
    from fseg_jax.wsi.pipeline import SlideSegmenter

    cfg = uni_config(args)
    if torch_model is None:
        model = VisionTransformer(cfg, rngs=nnx.Rngs(0))
    else:
        model = convert_timm_state_dict(torch_model.state_dict(), cfg)
    seg = SlideSegmenter.from_model(
        model, concepts_for(k, cfg.embed_dim, args.bank), method=args.method,
        dtype=None if args.dtype == "float32" else args.dtype,
        tile=args.tile, margin=args.margin, batch=args.batch, mpp=args.mpp, workers=args.workers,
        resolution=args.labels,
    )
    return cfg, seg


def run_pipeline(seg, slide_path):
    """End-to-end on the slide (compilation excluded); returns (tiles, seconds, summary)."""
    glass = np.full((seg.step.batch, seg.tile, seg.tile, 3), 255, np.uint8)
    seg.step.collect(seg.step.dispatch(glass))  # compile the full batch
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        result = seg.run(slide_path, Path(out) / "slide")
        seconds = time.perf_counter() - t0
    return result.tiles, seconds, result.summary


class TorchLoop:
    """The PyTorch way, one tile at a time: timm forward -> ReLU'd last-block tokens, margins cropped ->
    scikit-learn NNLS onto the concepts (the original F-Seg's solver and settings) -> argmax."""

    def __init__(self, args, cfg, k):
        import timm
        import torch

        self.torch = torch
        self.model = timm.create_model(
            "vit_large_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, init_values=1e-5,
            depth=cfg.depth,
        ).eval()
        self.concepts = np.maximum(concepts_for(k, cfg.embed_dim, args.bank), 0).astype(np.float64)
        self.mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, 3, 1, 1)
        self.m = args.margin // cfg.patch_size
        self.c = (args.tile - 2 * args.margin) // cfg.patch_size
        self.k = k

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Labels (c, c), forward seconds, NNLS seconds."""
        from sklearn.decomposition import non_negative_factorization

        torch, m, c = self.torch, self.m, self.c
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = (torch.tensor(image).permute(2, 0, 1)[None].float() / 255 - self.mean) / self.std
            tokens = self.model.forward_intermediates(x, indices=[-1], norm=False, intermediates_only=True)[0]
        feats = torch.relu(tokens[0]).permute(1, 2, 0)[m : m + c, m : m + c]
        t1 = time.perf_counter()
        w_nk, _, _ = non_negative_factorization(
            feats.reshape(-1, feats.shape[-1]).numpy().astype(np.float64), H=self.concepts, W=None,
            n_components=self.k, update_H=False, random_state=0, max_iter=10000,
        )
        labels = w_nk.argmax(-1).reshape(c, c)
        return labels, t1 - t0, time.perf_counter() - t1


def paired_tiles(args, cfg, seg, loop, n_tiles):
    """The same tissue tiles through both, alternating which goes first (the machine's load drifts)."""
    from fseg_jax.wsi.reader import open_slide
    from fseg_jax.wsi.tiling import TileGrid

    seg.step.collect(seg.step.dispatch(np.full((1, args.tile, args.tile, 3), 255, np.uint8)))  # compile
    read_s, jax_s, forward_s, nnls_s, agree = [], [], [], [], []
    with open_slide(args.slide) as slide:
        plan = slide.plan(args.mpp)
        grid = TileGrid.for_slide(plan.size, patch=cfg.patch_size, tile=args.tile, margin=args.margin)
        for i, t in enumerate(tissue_tiles(slide, grid)[:n_tiles]):
            t0 = time.perf_counter()
            image = slide.read(plan, *grid.read_box(int(t)))
            read_s.append(time.perf_counter() - t0)

            def run_jax():
                t0 = time.perf_counter()
                labels, _ = seg.step.collect(seg.step.dispatch(image[None]))
                jax_s.append(time.perf_counter() - t0)
                return labels[0]

            def run_torch():
                labels, f, n = loop(image)
                forward_s.append(f)
                nnls_s.append(n)
                return labels

            if i % 2:
                a, b = run_torch(), run_jax()
            else:
                b, a = run_jax(), run_torch()
            if a.shape != b.shape:  # per-pixel labels: compare at the token centres
                half = cfg.patch_size // 2
                b = b[half :: cfg.patch_size, half :: cfg.patch_size]
            agree.append(float((a == b).mean()))
    return {"read": read_s, "jax": jax_s, "forward": forward_s, "nnls": nnls_s, "agree": agree}


def read_throughput(seg, slide_path, n: int):
    """Tiles/s of the threaded reader alone, cycling over the slide's tissue tiles (decoded afresh each time)."""
    from fseg_jax.wsi.compute import prefetch_batches
    from fseg_jax.wsi.reader import open_slide
    from fseg_jax.wsi.tiling import TileGrid

    with open_slide(slide_path) as slide:
        if slide.backend == "openslide":  # no decoded-tile cache: every read decodes, as on a large slide
            import openslide

            slide._handle.set_cache(openslide.OpenSlideCache(0))
        plan = slide.plan(seg.mpp)
        grid = TileGrid.for_slide(plan.size, patch=seg.patch_size, tile=seg.tile, margin=seg.margin)
        tiles = tissue_tiles(slide, grid)
        order = [int(tiles[i % len(tiles)]) for i in range(n)]
        batches = [order[i : i + seg.step.batch] for i in range(0, n, seg.step.batch)]

        def read(t):
            x, y, w, h = grid.read_box(t)
            return slide.read(plan, x, y, w, h)

        t0 = time.perf_counter()
        for _ in prefetch_batches(batches, read, workers=seg.workers):
            pass
        return n / (time.perf_counter() - t0)


def compute_throughput(seg, n_batches: int):
    images = np.random.default_rng(0).integers(0, 256, (seg.step.batch, seg.tile, seg.tile, 3), dtype=np.uint8)
    seg.step.collect(seg.step.dispatch(images))  # compile
    t0 = time.perf_counter()
    handles = [seg.step.dispatch(images) for _ in range(n_batches)]
    for h in handles:
        seg.step.collect(h)
    return n_batches * seg.step.batch / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=SVS)
    ap.add_argument("--bank", type=Path, default=UNI_BANK, help="upstream UNI concept bank (joblib)")
    ap.add_argument("--gpu", action="store_true", help="GPU report (compute vs read tiles/s, 100k x 80k estimate)")
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--margin", type=int, default=32)
    ap.add_argument("--mpp", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--method", choices=["project", "nearest"], default="project",
                    help="nearest (cosine, no solver) isolates the forward pass")
    ap.add_argument("--labels", choices=["token", "pixel"], default="token",
                    help="token: the argmax per token, the PyTorch loop's work; pixel: F-Seg's per-pixel labels")
    ap.add_argument("--depth", type=int, default=0, help="fewer blocks than UNI's 24 (0 = all)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: one per CPU core)")
    ap.add_argument("--max-tiles", type=int, default=6, help="CPU: tiles timed through both, paired")
    ap.add_argument("--batches", type=int, default=20, help="GPU: batches timed for compute throughput")
    args = ap.parse_args()

    if not args.slide.is_file() and not args.gpu:
        raise SystemExit(f"slide not found: {args.slide}")

    import jax

    loop = None if args.gpu else TorchLoop(args, uni_config(args), args.k)
    cfg, seg = build_jax(args, args.k, None if loop is None else loop.model)
    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind}; UNI architecture depth {cfg.depth}, "
          f"tile {args.tile} px (margin {args.margin}) at {args.mpp} um/px, batch {seg.step.batch}, "
          f"k={args.k}, {args.method}, {args.dtype}")

    if args.gpu:
        compute = compute_throughput(seg, args.batches)
        rate = compute
        print(f"compute (steady state): {compute:.2f} tiles/s")
        if args.slide.is_file():
            read = read_throughput(seg, args.slide, 8 * seg.step.batch)
            tiles, seconds, summary = run_pipeline(seg, args.slide)
            print(f"reading ({seg.workers} threads): {read:.2f} tiles/s -> {'compute' if compute < read else 'read'}-bound")
            print(f"end to end on {args.slide.name}: {tiles} tissue tiles in {seconds:.1f} s "
                  f"({tiles / seconds:.2f} tiles/s; timing {summary['timing_s']})")
            rate = min(compute, read)
        else:
            print(f"slide not found ({args.slide}): reading and end to end skipped")
        core = args.tile - 2 * args.margin
        grid_tiles = math.ceil(100_000 / core) * math.ceil(80_000 / core)
        print(f"100k x 80k px slide at {args.mpp} um/px: {grid_tiles} tiles; estimated "
              f"{grid_tiles / rate / 60:.1f} min all tiles, {0.4 * grid_tiles / rate / 60:.1f} min at 40% tissue")
        return

    pairs = paired_tiles(args, cfg, seg, loop, args.max_tiles)
    n = len(pairs["jax"])
    jax_total = sum(pairs["jax"])
    torch_total = sum(pairs["forward"]) + sum(pairs["nnls"])
    print(f"same {n} tiles, paired: fseg_jax step {jax_total / n:.2f} s/tile; PyTorch loop {torch_total / n:.2f} s/tile "
          f"(timm forward {sum(pairs['forward']) / n:.2f}, scikit-learn NNLS {sum(pairs['nnls']) / n:.2f}); "
          f"fseg_jax {torch_total / jax_total:.2f}x tiles/s; labels agree on {100 * np.mean(pairs['agree']):.1f}% "
          f"of tokens; reading {sum(pairs['read']) / n:.3f} s/tile")

    tiles, seconds, summary = run_pipeline(seg, args.slide)
    timing = summary["timing_s"]
    print(f"fseg_jax pipeline end to end: {tiles} tissue tiles in {seconds:.1f} s = {tiles / seconds:.3f} tiles/s; "
          f"waiting on reads {timing['read_wait']:.2f} s ({100 * timing['read_wait'] / seconds:.1f}%), computing "
          f"{timing['compute']:.1f} s ({100 * timing['compute'] / seconds:.1f}%), tissue detection "
          f"{timing['tissue']:.2f} s, writing outputs {timing['write']:.2f} s")
    read = read_throughput(seg, args.slide, 2 * tiles)
    print(f"reading alone ({seg.workers} threads): {read:.1f} tiles/s, i.e. {100 * tiles / seconds / read:.1f}% of "
          f"the pipeline's time per tile")


if __name__ == "__main__":
    main()
