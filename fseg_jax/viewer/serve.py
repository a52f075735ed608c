"""Serving a written viewer folder over HTTP on this machine (the page reads its tiles into a canvas, which
browsers allow for pages served over HTTP, not for files opened from disk)."""

from __future__ import annotations

import errno
import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fseg_jax.viewer.build import ViewerError


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".dzi": "application/xml"}

    def log_message(self, format, *args) -> None:
        pass


def viewer_server(folder: str | Path, *, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """An HTTP server of `folder` bound to host:port (port 0: a free one), not yet serving.

    Call its serve_forever() (shutdown() from another thread stops it), then server_close(); its
    server_address holds the port bound. Raises ViewerError when the port is taken or not allowed.
    """
    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise ViewerError(f"{folder}: no index.html; write the viewer first")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ViewerError(f"port {port} on {host} is in use; choose another port") from None
        raise ViewerError(f"cannot serve on {host}:{port} ({err.strerror or err}); choose another port") from None


def viewer_address(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"
