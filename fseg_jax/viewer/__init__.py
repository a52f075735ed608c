"""A zoomable viewer of a slide run: Deep Zoom pyramids of the slide and its label map, and an OpenSeadragon page.

`write_viewer(out_dir)` writes it into the slide's output folder (``viewer/index.html`` and its tiles);
`viewer_server(folder)` serves it on this machine.
"""

from fseg_jax.viewer.build import ViewerError, legend_entries, write_viewer
from fseg_jax.viewer.deepzoom import DeepZoomGeometry
from fseg_jax.viewer.serve import viewer_address, viewer_server

__all__ = ["DeepZoomGeometry", "ViewerError", "legend_entries", "viewer_address", "viewer_server", "write_viewer"]
