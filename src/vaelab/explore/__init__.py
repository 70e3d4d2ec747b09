"""vaelab explore: a live latent-space explorer in the browser, served locally or exported as one HTML file.

    from vaelab.explore import serve, start, export
    serve("runs/demo")                       # blocks until Ctrl-C; prints the URL and opens the browser
    server = start("runs/demo", port=0)      # in a background thread: server.url, server.stop()
    export("runs/demo", "explorer.html")     # one self-contained file, no server needed

(The module is vaelab.explore; the command line's `vaelab explore` calls serve() or export().)
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import warnings
import webbrowser
from pathlib import Path

from ..config import ConfigError
from ..runs import Run, load_run
from .core import N_CODES, Explorer, RequestError
from .server import ExploreServer, is_loopback

DEFAULT_PORT = 8765


class ExposedWarning(UserWarning):
    """The explorer listens on an address other machines may reach."""


def _run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def check_n_codes(n_codes: int) -> None:
    if not isinstance(n_codes, int) or isinstance(n_codes, bool) or n_codes < 1:
        raise ConfigError(f"--codes must be an integer >= 1; got {n_codes!r}")


def start(run: Run | str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          n_codes: int = N_CODES, verbose: bool = False) -> ExploreServer:
    """Load the run, encode its test images and serve the explorer from a background thread.

    Returns the server (its .url; .stop() ends it). port=0 picks a free port. The run directory is only read.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be an integer in 0..65535 (0 picks a free port); got {port!r}")
    check_n_codes(n_codes)
    if not is_loopback(host):
        warnings.warn(f"listening on {host}: anyone who can reach this address can use the explorer and read "
                      "the run's test images (the default, 127.0.0.1, is reachable from this machine only)",
                      ExposedWarning, stacklevel=2)
    explorer = Explorer(_run(run), n_codes)
    try:
        server = ExploreServer(explorer, host, port, verbose)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address of this machine ({e.strerror})") from e
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} is in use; choose another (--port 0 picks a free one)") from e
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    server.start_background()
    return server


def serve(run: Run | str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          open_browser: bool = True, n_codes: int = N_CODES, verbose: bool = False) -> None:
    """Serve the explorer until Ctrl-C: print its URL, open it in the browser unless open_browser=False."""
    server = start(run, host, port, n_codes, verbose)
    print(f"vaelab explore: {server.url}  (Ctrl-C stops it)", flush=True)
    if open_browser:  # in a thread: some browsers' launchers block until the window closes
        threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print("vaelab explore: stopped", flush=True)


def export(run: Run | str | os.PathLike, path: str | os.PathLike, n_codes: int = 2000) -> Path:
    """Write one self-contained HTML file that explores the run without a server; return its path."""
    from .export import write_export

    check_n_codes(n_codes)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--export must be a file name, got the folder {path}")
    return write_export(Explorer(_run(run), n_codes), path)


__all__ = ["serve", "start", "export", "Explorer", "ExploreServer", "RequestError", "ExposedWarning",
           "DEFAULT_PORT"]
