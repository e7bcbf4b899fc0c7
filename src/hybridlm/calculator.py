"""Serve the interactive cache-memory calculator (hybridlm/web) on localhost.

The page is static (index.html, calculator.js, presets.js) and also works opened straight from
disk; the server only saves finding the file inside an installed package.

Example::

    hybridlm calculator --port 8765 --no-browser   # prints http://127.0.0.1:8765/
"""

from __future__ import annotations

import functools
import http.server
import webbrowser
from pathlib import Path

WEB_DIR = Path(__file__).parent / "web"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # one line per request would drown the address
        pass


def make_server(port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server for WEB_DIR on 127.0.0.1:``port`` (0: a free port), not yet serving.

    port: int in [0, 65535]. Read the chosen port from ``server.server_address[1]``.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an int from 0 to 65535, got {port!r}")
    if not (WEB_DIR / "index.html").is_file():
        raise FileNotFoundError(f"calculator page missing: {WEB_DIR / 'index.html'}")
    handler = functools.partial(_QuietHandler, directory=str(WEB_DIR))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(port: int = 8765, open_browser: bool = True) -> None:
    """Serve the page until interrupted, printing its address first."""
    server = make_server(port)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    print(f"hybridlm calculator: serving {url}  (Ctrl-C to stop)", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
