"""A cohort of slides over many processes, simulated with the assignment `fseg-jax slide` uses.

Draws a cohort (tissue tiles per slide log-normal around a median), assigns it to N processes with
`fseg_jax.wsi.cohort.assign_slides` (the function every process of a run calls) and plays each process's
units as a run does: its parts of split slides, then the outputs of the split slides it merges (once all
their parts are done), then its whole slides, each computed and then written. Prints the makespan against the
ideal (all work / N) and, for comparison, the scheme of older versions: every slide's tiles shared by all
processes, then one process writing every slide's outputs (`--merge`).

Times are modelled, not measured: a process computes `--tiles-per-second` tiles a second, and writing a
slide's outputs takes `--merge-seconds` plus its tiles over `--merge-tiles-per-second`. Cheap to run
(numpy and the assignment only):

    python bench/cohort.py --seed 0
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fseg_jax.wsi.cohort import assign_slides


def cohort(n_slides: int, median: float, sigma: float, batch: int, seed: int) -> list[dict[int, int]]:
    """{batch index: tiles} per slide, tissue tiles drawn log-normal around `median` (at least one tile)."""
    tiles = np.maximum(1, np.random.default_rng(seed).lognormal(np.log(median), sigma, n_slides).round()).astype(int)
    return [{b: min(batch, int(t) - b * batch) for b in range(-(-int(t) // batch))} for t in tiles]


def simulate(slides: list[dict[int, int]], count: int, rate: float, merge_s: float, merge_rate: float) -> dict:
    """Play the assignment of `slides` to `count` processes; its makespan and what it is made of, in seconds."""
    tiles = np.array([sum(s.values()) for s in slides])
    merge = merge_s + tiles / merge_rate
    t0 = time.perf_counter()
    assignment = assign_slides(slides, count)
    assign_s = time.perf_counter() - t0
    # each process: its parts, then its merges (once every part is done), then its whole slides
    finish = np.zeros(count)
    part_done: dict[int, float] = {}
    for i, units in enumerate(assignment.units):
        for unit in (u for u in units if u.parts > 1):
            finish[i] += unit.work / rate
            part_done[unit.slide] = max(part_done.get(unit.slide, 0.0), finish[i])
    for s, i in assignment.mergers.items():
        finish[i] = max(finish[i], part_done[s]) + merge[s]
    for i, units in enumerate(assignment.units):
        finish[i] += sum(unit.work / rate + merge[unit.slide] for unit in units if unit.parts == 1)
    total = tiles.sum() / rate + merge.sum()
    # older versions: every slide's batches dealt over all processes, then one process writes every slide
    batches = np.concatenate([list(s.values()) for s in slides])
    shared = max(batches[i::count].sum() for i in range(count)) / rate
    return {
        "ideal": total / count,
        "makespan": finish.max(),
        "split": len(assignment.mergers),
        "serial_merge": merge.sum(),
        "older": shared + merge.sum(),
        "assign_s": assign_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=10_000)
    parser.add_argument("--median-tiles", type=float, default=2000, help="median tissue tiles per slide")
    parser.add_argument("--sigma", type=float, default=0.8, help="log-normal spread (sigma of log tiles)")
    parser.add_argument("--batch", type=int, default=16, help="tiles per batch")
    parser.add_argument("--processes", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tiles-per-second", type=float, default=87.0, help="tiles a process computes a second")
    parser.add_argument("--merge-seconds", type=float, default=2.0, help="fixed seconds to write a slide's outputs")
    parser.add_argument("--merge-tiles-per-second", type=float, default=500.0,
                        help="tiles a second written into a slide's outputs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    slides = cohort(args.slides, args.median_tiles, args.sigma, args.batch, args.seed)
    tiles = np.array([sum(s.values()) for s in slides])
    print(f"{args.slides} slides, tissue tiles log-normal (median {args.median_tiles:.0f}, sigma {args.sigma}, seed "
          f"{args.seed}): mean {tiles.mean():.0f}, largest {tiles.max()}, total {tiles.sum()}; {args.tiles_per_second} "
          f"tiles/s a process, writing {args.merge_seconds} s + tiles / {args.merge_tiles_per_second} a slide")
    print("| processes | ideal (all work / N) | makespan | makespan / ideal | slides split | serial merge | "
          "older versions (shared tiles, then --merge) | assignment computed in |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for count in args.processes:
        r = simulate(slides, count, args.tiles_per_second, args.merge_seconds, args.merge_tiles_per_second)
        print(f"| {count} | {_duration(r['ideal'])} | {_duration(r['makespan'])} | {r['makespan'] / r['ideal']:.4f} | "
              f"{r['split']} | {_duration(r['serial_merge'])} | {_duration(r['older'])} "
              f"({r['older'] / r['makespan']:.1f}x) | {r['assign_s']:.2f} s |")


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


if __name__ == "__main__":
    main()
