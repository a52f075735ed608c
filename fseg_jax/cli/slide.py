"""`fseg-jax slide`: segment whole slides into concepts (OME-TIFF labels, QuPath GeoJSON, overlay, summary)."""

from __future__ import annotations

from pathlib import Path

import click

from fseg_jax.cli.common import run_options
from fseg_jax.options import RESOLUTIONS, SLIDE_DEFAULTS


@click.command("slide")
@click.argument("slides", type=click.Path(exists=True, path_type=Path))
@run_options
@click.option("--labels", "resolution", type=click.Choice(RESOLUTIONS), default=SLIDE_DEFAULTS["resolution"],
              show_default=True,
              help="pixel: F-Seg's per-pixel argmax of the bilinearly upsampled weights; token: one label per "
                   "token (faster).")
@click.option("--mpp", type=float, default=SLIDE_DEFAULTS["mpp"], show_default=True,
              help="Working microns per pixel (0.5 ~ 20x).")
@click.option("--slide-mpp", type=float, default=SLIDE_DEFAULTS["slide_mpp"],
              help="The slides' own microns per pixel, for files that do not record it (or record it wrongly).")
@click.option("--force-slide-mpp", is_flag=True,
              help="Use --slide-mpp even where it contradicts the file's own by more than 2x.")
@click.option("--tile", type=int, default=SLIDE_DEFAULTS["tile"],
              help="Tile side in working pixels, a multiple of the patch [default: 1024 rounded down to one: 1022 "
                   "at patch 14].")
@click.option("--margin", type=int, default=SLIDE_DEFAULTS["margin"],
              help="Context discarded on each tile side, in pixels [default: tile/16 rounded down to a multiple of "
                   "the patch: 64 at tile 1024, 56 at 1022].")
@click.option("--save-weights", is_flag=True, help="Also write the token weights (weights.safetensors).")
@click.option("--distributed", is_flag=True,
              help="Join a jax.distributed run found by cluster auto-detection (SLURM, Open MPI, Cloud TPU, ...): "
                   "the slides are spread over its processes.")
@click.option("--coordinator", metavar="HOST:PORT",
              help="Join a run of --num-processes processes whose process 0 serves at HOST:PORT (with --process-id).")
@click.option("--num-processes", type=int, help="Processes in the run (with --coordinator).")
@click.option("--process-id", type=int, help="This process's index, 0 .. N-1; process 0 runs the coordinator.")
@click.option("--coordinator-timeout", type=int, default=300, show_default=True,
              help="Seconds to wait for the coordinator and the other processes.")
@click.option("--viewer", is_flag=True,
              help="Also write a zoomable viewer per slide (OUT/<slide name>/viewer/index.html; serve it with "
                   "`fseg-jax view`).")
@click.option("--merge", "merge_only", is_flag=True,
              help="Only write the outputs of a finished multi-process run made by an older version.")
@click.option("--wait", is_flag=True, help="Wait for a slide folder another run is using instead of failing that slide.")
@click.option("--compilation-cache", type=click.Path(file_okay=False), default=None,
              help="JAX compilation cache folder [default: $FSEG_JAX_CACHE/jax or ~/.cache/fseg_jax/jax].")
@click.option("--no-compilation-cache", is_flag=True, help="Do not use the persistent compilation cache.")
@click.option("-o", "--out", "--output", "out_root", type=click.Path(path_type=Path), required=True, help="Output folder (one sub-folder per slide).")
def slide(slides, resolution, mpp, slide_mpp, force_slide_mpp, tile, margin, save_weights, distributed, coordinator,
          num_processes, process_id, coordinator_timeout, viewer, merge_only, wait, compilation_cache,
          no_compilation_cache, out_root, concepts, k, **options):
    """Segment SLIDES (a slide, an image, or a folder of them) into OUT/<slide name>/.

    Writes labels.ome.tif (0 = background, i+1 = concept i), labels.geojson (QuPath annotations),
    overlay.png and summary.json per slide (and with --viewer, viewer/). When the bank names the concepts
    of this k (fseg-jax concepts name), they show classes instead: i+1 = class i, the concepts that share a
    name as one. A re-run resumes an interrupted one; a slide that fails is reported and skipped; a slide
    folder another run is using is refused (or waited for, --wait). Several processes (one per host) share
    the slides with --coordinator/--num-processes/--process-id (or --distributed): each slide is computed
    and written by one of them, and only a slide too large for one is split over several.
    """
    from fseg_jax.wsi.pipeline import FolderBusy, SlideFailure, find_slides, merge_slide, segment_slides, slide_out_dirs

    try:
        paths = find_slides(slides)
        out_dirs = slide_out_dirs(paths, out_root)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if merge_only:
        failed = 0
        for path, out_dir in zip(paths, out_dirs):
            try:
                summary = merge_slide(out_dir, wait=wait)
                click.echo(f"{path.name}: merged, {summary['tiles']['tissue']} tiles")
            except (ValueError, FolderBusy) as err:
                failed += 1
                click.echo(f"{path.name}: {err}", err=True)
                continue
            if viewer and not _write_viewer(path, out_dir):
                failed += 1
        raise SystemExit(1 if failed else 0)

    if concepts is None and options["method"] != "dff":
        raise click.UsageError("--concepts is required (except with --merge and for method dff)")
    from fseg_jax.options import check_positive

    for hint, name, value in (("--mpp", "mpp", mpp), ("--slide-mpp", "slide_mpp", slide_mpp)):
        if value is not None:
            try:
                check_positive(name, value)
            except ValueError as err:
                raise click.BadParameter(str(err), param_hint=hint) from None
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise click.UsageError("--coordinator, --num-processes and --process-id go together")
    if num_processes is not None:
        if num_processes < 1:
            raise click.BadParameter(f"must be >= 1, got {num_processes}", param_hint="--num-processes")
        if not 0 <= process_id < num_processes:
            raise click.BadParameter(
                f"{process_id} is out of range for {num_processes} processes (0 .. {num_processes - 1})",
                param_hint="--process-id",
            )
    if not no_compilation_cache:
        from fseg_jax.cli.common import default_compilation_cache
        from fseg_jax.compilation import enable_compilation_cache

        enable_compilation_cache(compilation_cache or default_compilation_cache())
    processes = None
    if coordinator is not None or distributed:
        import jax

        from fseg_jax.wsi.cohort import JaxProcesses

        if coordinator is not None:
            _check_coordinator(coordinator, process_id, coordinator_timeout)
            jax.distributed.initialize(
                coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                initialization_timeout=coordinator_timeout,
            )
        else:
            jax.distributed.initialize(initialization_timeout=coordinator_timeout)
        processes = JaxProcesses()

    from fseg_jax.cli.common import pipeline_from_options
    from fseg_jax.wsi.pipeline import DeviceMemoryError, SlideRunMismatch, SlideSegmenter

    pipeline = pipeline_from_options(concepts, k, **options)
    try:
        segmenter = SlideSegmenter.from_pipeline(
            pipeline, tile=tile, margin=margin, mpp=mpp, resolution=resolution, save_weights=save_weights,
        )
    except (ValueError, TypeError) as err:  # a tile or margin that does not fit the model's patch, ...
        raise click.ClickException(str(err)) from None

    viewer_failures = []

    def report(result) -> None:
        if isinstance(result, SlideFailure):
            click.echo(f"FAILED {result.slide.name}: {result.error}", err=True)
        elif not result.complete:
            click.echo(f"{result.slide.name}: part computed ({result.tiles_computed} tiles); one process writes the outputs")
        else:
            if result.replaced:
                click.echo(f"{result.slide.name}: {result.replaced}")
            if result.tiles_computed or not result.tiles:
                note = f"{result.tiles_computed} tiles computed"
            else:
                note = "re-merged from earlier work" if result.merged else "already done"
            click.echo(f"{result.slide.name}: {result.tiles} tissue tiles, {note}, {result.seconds:.1f} s -> {result.out_dir}")
            if viewer and not _write_viewer(result.slide, result.out_dir):
                viewer_failures.append(result.slide)

    try:
        results = segment_slides(
            paths, out_root, segmenter, slide_mpp=slide_mpp, force_slide_mpp=force_slide_mpp, processes=processes,
            wait=wait, progress=True, on_result=report,
        )
    except (DeviceMemoryError, SlideRunMismatch) as err:
        raise click.ClickException(str(err)) from None
    failures = [r for r in results if isinstance(r, SlideFailure)]
    if processes is not None and processes.count > 1:  # every process ends with the same view of the run
        failed = "".join(f"; {r.slide.name} failed (process {r.process})" for r in failures)
        click.echo(f"all processes: {len(results) - len(failures)} of {len(results)} slides done{failed}")
    if failures:
        click.echo(f"{len(failures)} of {len(results)} slides failed", err=True)
    if viewer_failures:
        click.echo(f"{len(viewer_failures)} viewers could not be written", err=True)
    if failures or viewer_failures:
        raise SystemExit(1)


def _write_viewer(slide_path: Path, out_dir: Path) -> bool:
    """Write a finished slide's viewer and say where; False (and why, on stderr) when it cannot be written.

    Any error is reported this way: a viewer that fails must not end a batch of slides.
    """
    from fseg_jax.cli.common import one_line
    from fseg_jax.viewer import write_viewer

    try:
        index = write_viewer(out_dir, slide=slide_path)
    except Exception as err:  # noqa: BLE001 - reported for this slide; the next slides go on
        reason = one_line(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {one_line(err)}"
        click.echo(f"FAILED viewer of {slide_path.name}: {reason}", err=True)
        return False
    click.echo(f"{slide_path.name}: viewer -> {index}")
    return True


def _check_coordinator(address: str, process_id: int, timeout: float) -> None:
    """Fail with one clear message where jax.distributed.initialize would abort the process.

    Process 0 serves the coordinator: its port must be free to bind. The others connect to it: they wait
    (process 0 may start later) up to `timeout` seconds for the address to accept a connection.
    """
    import socket
    import time

    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise click.BadParameter(f"expected HOST:PORT, got {address!r}", param_hint="--coordinator")
    port = int(port_text)
    if process_id == 0:
        try:
            with socket.create_server(("", port)):
                pass
        except OSError as err:
            raise click.ClickException(f"process 0 cannot serve the coordinator on port {port}: {err}") from None
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, timeout))):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise click.ClickException(
                    f"cannot reach the coordinator at {address} within {timeout} s ({err}); start process 0 "
                    "there, or check the address"
                ) from None
            time.sleep(0.5)
