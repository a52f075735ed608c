"""`fseg-jax view`: write (when needed) and serve the zoomable viewer of a slide run's output folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("view")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--slide", "slide_path", type=click.Path(path_type=Path),
              help="The slide file [default: the path summary.json records].")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to serve on, on 127.0.0.1 (0: any free port).")
@click.option("--write-only", is_flag=True, help="Write the viewer, print where, and do not serve it.")
@click.option("--tile-size", type=click.IntRange(1), default=254, show_default=True, help="Deep Zoom tile side in pixels.")
@click.option("--quality", type=click.IntRange(1, 100), default=90, show_default=True, help="JPEG quality of the slide's tiles.")
def view(out_dir, slide_path, port, write_only, tile_size, quality):
    """Serve the viewer of OUT_DIR (a slide's folder, OUT/<slide name>, of `fseg-jax slide`).

    The viewer (OUT_DIR/viewer/index.html: the slide and its labels as Deep Zoom pyramids in OpenSeadragon) is
    written first where it is missing or stale; Ctrl-C stops the server.
    """
    from fseg_jax.cli.common import one_line
    from fseg_jax.viewer import ViewerError, viewer_address, viewer_server, write_viewer

    try:
        index = write_viewer(out_dir, slide=slide_path, tile_size=tile_size, quality=quality)
    except (ValueError, OSError) as err:
        raise click.ClickException(one_line(err)) from None
    if write_only:
        click.echo(str(index))
        return
    try:
        server = viewer_server(index.parent, port=port)
    except ViewerError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"serving {index.parent} at {viewer_address(server)} (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    click.echo("stopped")
