"""The broker's HTTP port (`jobbroker serve --metrics-port P`): Prometheus /metrics and a
read-only dashboard (/ and its JSON, /api/overview).

It runs in threads of its own, away from the event loop: every request that needs figures asks
the loop for one snapshot (call_soon_threadsafe) and waits for it, so the job core is only
ever touched on the loop.

Protection: on loopback without a token, requests must name a loopback or IP-literal host (a
web page elsewhere cannot rebind its own name to 127.0.0.1 and read the dashboard). With a
token, every request carries it: `Authorization: Bearer TOKEN` (Prometheus scrapes), or the
session cookie that the login form sets (browsers). The broker refuses to serve this port off
loopback without a token (ConfigError).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from jobbroker.broker.config import is_loopback
from jobbroker.broker.errors import ConfigError
from jobbroker.broker.metrics import MetricsCollector
from jobbroker.broker.reports import ReportSource, metrics, overview
from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["SESSION_COOKIE", "WebServer"]

log = logging.getLogger("jobbroker.web")

SESSION_COOKIE = "jobbroker_session"
_REQUEST_TIMEOUT = 10.0  # seconds a client has to send its request (and finish a TLS handshake)
_MAX_LOGIN_BODY = 4096
_STATIC = {  # path -> (file in broker/dashboard, content type)
    "/": ("index.html", "text/html; charset=utf-8"),
    "/login": ("login.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_PUBLIC = frozenset({"/login", "/static/dashboard.js", "/static/dashboard.css"})
_SECURITY_HEADERS = [
    # No inline script or style, nothing from elsewhere, never framed: the page shows only
    # what our own script puts in it, as text.
    ("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]

StartResponse = Callable[..., Any]


class WebApp:
    """The WSGI application: routing, protection and the dashboard's files.

    Args:
        metrics: returns the figures /metrics shows (called on the broker's loop).
        overview: returns the dashboard's JSON document (called on the broker's loop).
        token: required on every request when set; None: loopback only, no login.
    """

    def __init__(
        self,
        metrics: Callable[[], dict[str, Any]],
        overview: Callable[[], dict[str, Any]],
        token: bytes | None,
    ) -> None:
        registry = CollectorRegistry()
        registry.register(MetricsCollector(metrics))
        self._prometheus = make_wsgi_app(registry)
        self._overview = overview
        self._token = token
        # The cookie holds a MAC of the token, not the token: it opens this dashboard only.
        self._session = None if token is None else hmac.new(token, b"jobbroker dashboard", hashlib.sha256).hexdigest()
        self._files = {path: (_read_asset(name), kind) for path, (name, kind) in _STATIC.items()}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        if self._token is None and not _loopback_host(environ.get("HTTP_HOST", "")):
            return _reply(start_response, "403 Forbidden", "this address serves loopback names only\n")
        if path == "/login" and self._token is not None and method == "POST":
            return self._login(environ, start_response)
        if method not in ("GET", "HEAD"):
            return _reply(start_response, "405 Method Not Allowed", "read-only\n", [("Allow", "GET, HEAD")])
        if path in _PUBLIC and (path != "/login" or self._token is not None):
            return self._file(path, start_response)  # the login page and its script and style: no data
        if not self._authorized(environ):
            if path == "/":
                return _reply(start_response, "303 See Other", "", [("Location", "login")])
            headers = [("WWW-Authenticate", 'Bearer realm="jobbroker"')]
            return _reply(start_response, "401 Unauthorized", "a token is needed: see docs/security.md\n", headers)
        if path == "/metrics":
            return self._prometheus(environ, start_response)
        if path == "/api/overview":
            body = json.dumps(self._overview(), default=str).encode()
            return _reply(start_response, "200 OK", body, [("Content-Type", "application/json")])
        if path == "/":
            return self._file(path, start_response)
        return _reply(start_response, "404 Not Found", "not found\n")

    def _authorized(self, environ: dict[str, Any]) -> bool:
        if self._token is None or self._session is None:
            return True
        scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return True
        cookie = _cookies(environ.get("HTTP_COOKIE", "")).get(SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self._session.encode())

    def _login(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        assert self._token is not None and self._session is not None
        try:
            length = min(int(environ.get("CONTENT_LENGTH") or 0), _MAX_LOGIN_BODY)
        except ValueError:
            length = 0
        form = urllib.parse.parse_qs(environ["wsgi.input"].read(length).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip().encode()
        if not hmac.compare_digest(given, self._token):
            log.warning("dashboard login refused from %s", environ.get("REMOTE_ADDR", "?"))
            return _reply(start_response, "303 See Other", "", [("Location", "login?failed=1")])
        cookie = f"{SESSION_COOKIE}={self._session}; HttpOnly; SameSite=Strict; Path=/"
        if environ.get("wsgi.url_scheme") == "https":
            cookie += "; Secure"
        return _reply(start_response, "303 See Other", "", [("Location", "./"), ("Set-Cookie", cookie)])

    def _file(self, path: str, start_response: StartResponse) -> Iterable[bytes]:
        body, kind = self._files[path]
        return _reply(start_response, "200 OK", body, [("Content-Type", kind)])


class WebServer:
    """Serves WebApp from threads; figures come from the event loop.

    Args:
        loop: the broker's event loop.
        reports: what the broker hands over, read on that loop (see broker/reports.py).
        host, port: where to listen (loopback unless you mean otherwise; 0 picks a port).
        token: see WebApp; required off loopback.
        tls: serve HTTPS with this context (the broker's own, when it has one).

    Raises:
        ConfigError: off loopback without a token, or the address cannot be bound.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reports: ReportSource,
        host: str,
        port: int,
        *,
        token: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if token is None and not is_loopback(host):
            raise ConfigError(f"the metrics port on {host} (not loopback) needs a token: --metrics-token-file")
        self._loop = loop
        app = WebApp(self._on_loop(lambda: metrics(reports)), self._on_loop(lambda: overview(reports)), token)
        server_class = _ThreadingServer6 if ":" in host else _ThreadingServer
        try:
            self._server = server_class((host, port), _QuietHandler)
        except OSError as exc:
            raise ConfigError(f"cannot serve the metrics port on {host}:{port}: {exc.strerror or exc}") from exc
        self._server.tls = tls
        self._server.set_app(app)
        self._thread = threading.Thread(target=self._server.serve_forever, name="jobbroker-web", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _on_loop(self, call: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def from_thread() -> dict[str, Any]:
            answer: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

            def take() -> None:
                try:
                    answer.set_result(call())
                except Exception as exc:
                    answer.set_exception(exc)

            self._loop.call_soon_threadsafe(take)
            return answer.result(timeout=10)

        return from_thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake happens here, in the request's own thread, so that a slow client
        # never holds up accept().
        if self.tls is not None:
            request.settimeout(_REQUEST_TIMEOUT)
            request = self.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics port: request from %s failed", client_address, exc_info=True)


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    timeout = _REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        if isinstance(self.connection, ssl.SSLSocket):
            environ["HTTPS"] = "on"  # wsgiref derives wsgi.url_scheme from it
        return environ


def _reply(
    start_response: StartResponse, status: str, body: str | bytes, headers: list[tuple[str, str]] | None = None
) -> list[bytes]:
    data = body.encode() if isinstance(body, str) else body
    all_headers = [("Content-Type", "text/plain; charset=utf-8"), *_SECURITY_HEADERS]
    if headers:
        given = {name.lower() for name, _ in headers}
        all_headers = [h for h in all_headers if h[0].lower() not in given] + headers
    start_response(status, [*all_headers, ("Content-Length", str(len(data)))])
    return [data]


def _loopback_host(host_header: str) -> bool:
    """Whether a Host header names this machine by loopback name or any IP literal (only a
    DNS name can be rebound; an empty header is an HTTP/1.0 client)."""
    if not host_header:
        return True
    host = host_header.rsplit("]", 1)[0].lstrip("[") if host_header.startswith("[") else host_header.split(":")[0]
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _cookies(header: str) -> dict[str, str]:
    pairs = (part.strip().partition("=") for part in header.split(";"))
    return {name: value for name, _, value in pairs if name}


def _read_asset(name: str) -> bytes:
    return importlib.resources.files("jobbroker.broker").joinpath("dashboard", name).read_bytes()
