"""The explorer's HTTP side: a small local web server for the page and its API (standard library only).

Routes are a fixed table matched on the raw path, so no URL can name a file outside the page's own assets;
query strings are parsed strictly; every malformed request gets a 4xx with a one-line reason and the server
keeps serving. See docs/explore.md for the API.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qsl, urlsplit

from .core import MAX_SEED, MAX_SIGMA, Explorer, RequestError, parse_int, parse_number, png_strip

JSON, PNG, TEXT = "application/json", "image/png", "text/plain; charset=utf-8"
ASSET_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
PAGE_ASSETS = ("explorer.css", "explorer.js", "server-backend.js")
MAX_DRAWS = 16


def read_asset(name: str) -> str:
    # one step per joinpath: Python 3.10's Traversable takes a single child
    return resources.files(__package__).joinpath("static").joinpath(name).read_text(encoding="utf-8")


class App:
    """Request path -> (status, content type, body); knows the routes and their parameters, not sockets."""

    def __init__(self, explorer: Explorer):
        self.ex = explorer
        self.assets = {f"/static/{name}": (ASSET_TYPES["." + name.rsplit(".", 1)[1]], read_asset(name).encode())
                       for name in PAGE_ASSETS}
        page = read_asset("index.html").encode()
        self.assets["/"] = self.assets["/index.html"] = (ASSET_TYPES[".html"], page)
        self.routes = {  # path -> (handler, allowed parameters, required parameters)
            "/api/info": (self.info, (), ()),
            "/api/codes": (self.codes, (), ()),
            "/api/decode": (self.decode, ("z",), ("z",)),
            "/api/sample": (self.sample, ("z", "sigma", "seed", "n"), ("z",)),
            "/api/encode": (self.encode, ("index",), ("index",)),
            "/api/image": (self.image, ("index",), ("index",)),
        }
        self._codes: bytes | None = None

    def respond(self, raw: str) -> tuple[int, str, bytes]:
        if not raw.startswith("/") or raw.startswith("//"):  # no absolute URLs: this is not a proxy
            raise RequestError(f"the request target must be a path such as /api/info, got {_printable(raw)!r}")
        try:
            parts = urlsplit(raw)
        except ValueError as e:
            raise RequestError(f"malformed URL ({e})") from e
        if parts.path in self.assets:
            if parts.query:
                raise RequestError(f"{parts.path} takes no query parameters")
            ctype, body = self.assets[parts.path]
            return 200, ctype, body
        if parts.path not in self.routes:
            raise RequestError(f"no such page: {_printable(parts.path)} (the API is under /api/: info, codes, "
                               "decode, sample, encode, image)", status=404)
        handler, allowed, required = self.routes[parts.path]
        query = parse_query(parts.query, allowed, required)
        ctype, body = handler(query)
        return 200, ctype, body

    # each handler: checked query parameters -> (content type, body)
    def info(self, q: dict) -> tuple[str, bytes]:
        return JSON, _json(self.ex.info())

    def codes(self, q: dict) -> tuple[str, bytes]:
        if self._codes is None:  # the same N x L numbers every time: encoded once
            self._codes = _json(self.ex.codes_payload())
        return JSON, self._codes

    def decode(self, q: dict) -> tuple[str, bytes]:
        return PNG, png_strip(self.ex.decode(self.ex.parse_z(q["z"])))

    def encode(self, q: dict) -> tuple[str, bytes]:
        return JSON, _json(self.ex.encode(self.ex.parse_index(q["index"])))

    def image(self, q: dict) -> tuple[str, bytes]:
        return PNG, png_strip(self.ex.image(self.ex.parse_index(q["index"])))

    def sample(self, q: dict) -> tuple[str, bytes]:
        z = self.ex.parse_z(q["z"])
        sigma = parse_number(q["sigma"], "sigma", 0.0, MAX_SIGMA) if "sigma" in q else None
        seed = parse_int(q["seed"], "seed", 0, MAX_SEED) if "seed" in q else 0
        n = parse_int(q["n"], "n", 1, MAX_DRAWS) if "n" in q else 1
        return PNG, png_strip(self.ex.sample(z, sigma, seed, n))


def _json(payload) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def parse_query(query: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, str]:
    """Strict key=value pairs: each key at most once, only allowed keys, required keys present."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=8,
                          errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"malformed query string ({_printable(str(e))})") from e
    out: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            names = ", ".join(allowed) if allowed else "none"
            raise RequestError(f"unknown parameter {_printable(key)!r}; allowed: {names}")
        if key in out:
            raise RequestError(f"parameter {key!r} given twice")
        out[key] = value
    missing = [k for k in required if k not in out]
    if missing:
        raise RequestError(f"missing parameter {missing[0]!r}")
    return out


def _printable(text: str, n: int = 60) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= n else text[:n] + "..."


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a pointer move costs one request, not a new connection
    default_request_version = "HTTP/1.0"  # a request line without a version still gets a status line back
    server_version = "vaelab-explore"
    error_content_type = TEXT
    error_message_format = "%(code)d %(message)s\n"  # http.server's own errors (bad request line, ...)
    timeout = 60  # idle keep-alive connections close after a minute
    disable_nagle_algorithm = True  # headers and body go out at once (else ~40 ms of delayed ACK per request)
    server: ExploreServer

    def do_GET(self) -> None:
        try:
            if not self.server.host_allowed(self.headers.get("Host", "")):
                raise RequestError(f"Host {_printable(self.headers.get('Host', ''))!r} is not this server's "
                                   "address", status=403)
            status, ctype, body = self.server.app.respond(self.path)
        except RequestError as e:
            status, ctype, body = e.status, TEXT, f"{e}\n".encode()
        except Exception as e:  # a bug, not the request's fault: say so in one line and keep serving
            traceback.print_exc(file=sys.stderr)
            status, ctype, body = 500, TEXT, f"internal error: {type(e).__name__}: {e}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)
        self.server.count(status)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        if code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:  # a malformed request is a 4xx, whatever its version
            code, message = HTTPStatus.BAD_REQUEST, message or "HTTP version not supported"
        super().send_error(code, message, explain)

    def not_allowed(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, f"method {_printable(self.command)} not allowed: "
                        "the explorer answers GET only")

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # POST, PUT, any other verb: 405 rather than http.server's 501
            return self.not_allowed
        raise AttributeError(name)

    def log_message(self, format: str, *args) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


class ExploreServer(ThreadingHTTPServer):
    """The explorer's server, bound at construction (port 0 picks a free port); serve_forever() runs it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0, verbose: bool = False):
        self.app, self.verbose = App(explorer), verbose
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.statuses: dict[int, int] = {}
        self._count_lock = threading.Lock()
        self._connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        super().__init__((host, port), Handler)
        self.host = host
        self.loopback = is_loopback(host)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def host_allowed(self, header: str) -> bool:
        """On a loopback address, only requests addressed to it (a page elsewhere that rebinds its own name to
        127.0.0.1 still cannot read the API); on other addresses, any."""
        if not self.loopback:
            return True
        return header in {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]", self.host)}

    def count(self, status: int) -> None:
        with self._count_lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def handle_error(self, request, client_address) -> None:
        """A browser that went away mid-answer (a closed tab, a superseded image) is not worth a traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def process_request(self, request, client_address) -> None:
        self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        self._connections.discard(request)
        super().shutdown_request(request)

    def start_background(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="vaelab-explore", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        """Stop listening and end every open connection (a browser's kept-alive ones too)."""
        self.shutdown()
        self.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):  # already closed by the other side
                conn.shutdown(socket.SHUT_RDWR)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
