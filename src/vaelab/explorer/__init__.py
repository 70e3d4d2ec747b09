"""The live latent-space explorer: a local web page over a run, or one self-contained HTML file.

    import vaelab
    vaelab.explore("runs/demo")                            # serve until Ctrl-C: prints the URL, opens the browser
    vaelab.explore("runs/demo", export="explorer.html")    # one file that works without a server

    from vaelab.explorer import start
    server = start(vaelab.load_run("runs/demo"), port=0)   # in a background thread: server.url, server.stop()
"""

from __future__ import annotations

import contextlib
import errno
import signal
import socket
import threading
import warnings
import webbrowser
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..runs import Run
from .core import N_CODES, Explorer, RequestError
from .server import ExploreServer, is_loopback
from .standalone import write_export

DEFAULT_PORT = 8765
N_CODES_EXPORT = 2000  # codes embedded in an exported file (its size grows with them)


class ExposedWarning(UserWarning):
    """The explorer listens on an address that other machines may reach."""


def check_n_codes(n_codes: int) -> None:
    if not isinstance(n_codes, int) or isinstance(n_codes, bool) or n_codes < 1:
        raise ConfigError(f"--codes must be an integer >= 1; got {n_codes!r}")


def check_port(port: int) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be an integer in 0..65535 (0 picks a free port); got {port!r}")


def start(run: Run, host: str = "127.0.0.1", port: int = DEFAULT_PORT, n_codes: int = N_CODES,
          verbose: bool = False) -> ExploreServer:
    """Encode the run's test images and serve the explorer from a background thread; return the server
    (.url; .stop() ends it). port=0 picks a free port. The run directory is only read, never written."""
    check_port(port)
    check_n_codes(n_codes)
    if not is_loopback(host):
        warnings.warn(f"--host {host} is not a loopback address: anyone who can reach it can use the explorer and "
                      "see the run's test images (the default, 127.0.0.1, is reachable from this machine only)",
                      ExposedWarning, stacklevel=2)
    explorer = Explorer(run, n_codes)
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


def serve(run: Run, host: str = "127.0.0.1", port: int = DEFAULT_PORT, open_browser: bool = True,
          n_codes: int = N_CODES, verbose: bool = False, announce: Callable[[str], None] | None = None) -> None:
    """Serve the explorer until Ctrl-C or SIGTERM (`kill`), then return. `announce(url)` is called once it
    listens (default: print the URL); then the browser opens unless open_browser=False."""
    server = start(run, host, port, n_codes, verbose)
    try:
        with _stopped_by_sigterm():
            (announce or (lambda url: print(f"vaelab explore: {url}  (Ctrl-C stops it)", flush=True)))(server.url)
            if open_browser:  # in a thread: some browsers' launchers block until their window closes
                threading.Thread(target=webbrowser.open, args=(server.url,), daemon=True).start()
            threading.Event().wait()
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        server.stop()


class _Terminated(Exception):
    """SIGTERM arrived while serving."""


@contextlib.contextmanager
def _stopped_by_sigterm():
    """While inside, SIGTERM raises _Terminated in the main thread, as Ctrl-C raises KeyboardInterrupt; the previous
    handler is put back on the way out. Elsewhere than the main thread (where Python runs no signal handler)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def export(run: Run, path: str | Path, n_codes: int = N_CODES_EXPORT) -> Path:
    """Write one self-contained HTML explorer of the run to `path` (atomically); return the path."""
    check_n_codes(n_codes)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--export must be a file name, got the folder {path}")
    return write_export(Explorer(run, n_codes), path)


__all__ = ["DEFAULT_PORT", "N_CODES", "N_CODES_EXPORT", "ExploreServer", "Explorer", "ExposedWarning", "RequestError",
           "export", "serve", "start"]
