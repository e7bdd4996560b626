"""The ``/metrics`` HTTP endpoint: bind address, optional TLS and HTTP basic auth.

prometheus-client's ``start_http_server`` serves any address and TLS, but has
no authentication, and it does the TLS handshake in its accept loop (one slow
client stalls every scrape). This server is prometheus-client's WSGI app behind
a small basic-auth check, in a threading server that does each TLS handshake in
the connection's own thread, with a timeout.

Everything is checked when the endpoint starts (``MetricsEndpoint.from_config``):
certificate and key both given, readable and matching; a username with a
password and the reverse. A problem is a ``ConfigError`` naming the key and the
file, never the password.

>>> auth = BasicAuth("prom", "s3cret")
>>> import base64
>>> auth.check("Basic " + base64.b64encode(b"prom:s3cret").decode())
True
>>> auth.check("Basic " + base64.b64encode(b"prom:guess").decode()), auth.check(None), auth.check("Bearer x")
(False, False, False)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from stream.config import ConfigError, MetricsConfig

__all__ = ["ENV_PASSWORD", "ENV_USERNAME", "BasicAuth", "MetricsEndpoint", "start_metrics_server"]

#: Environment variables for the basic-auth credentials (the password is never in the TOML).
ENV_USERNAME = "STREAM_METRICS_USERNAME"
ENV_PASSWORD = "STREAM_METRICS_PASSWORD"
#: A client that has not finished its TLS handshake or request by then is dropped.
HANDSHAKE_TIMEOUT_S = 10.0
REALM = "stream metrics"

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BasicAuth:
    """HTTP basic auth with one user; username and password compared in constant time."""

    def __init__(self, username: str, password: str) -> None:
        self._user = username.encode("utf-8")
        self._password = password.encode("utf-8")

    def check(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # Both comparisons always run: the time does not tell which one failed.
        ok_user = hmac.compare_digest(user, self._user)
        ok_password = hmac.compare_digest(password, self._password)
        return bool(sep) and ok_user and ok_password

    def wrap(self, app: WSGIApp) -> WSGIApp:
        def authenticated(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if self.check(environ.get("HTTP_AUTHORIZATION")):
                return app(environ, start_response)
            body = b"401 Unauthorized: /metrics needs HTTP basic auth\n"
            start_response(
                "401 Unauthorized",
                [
                    ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]

        return authenticated


@dataclass(frozen=True)
class MetricsEndpoint:
    """What ``/metrics`` serves on, validated: address, TLS files, credentials."""

    host: str
    port: int
    certfile: str | None = None
    keyfile: str | None = None
    auth: BasicAuth | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.certfile else "http"

    @classmethod
    def from_config(cls, m: MetricsConfig, environ: dict[str, str] | None = None) -> MetricsEndpoint:
        env = os.environ if environ is None else environ
        certfile = keyfile = None
        if m.tls_cert_file or m.tls_key_file:
            if not (m.tls_cert_file and m.tls_key_file):
                raise ConfigError("[metrics] tls_cert_file and tls_key_file go together (both or neither)")
            certfile = _readable(m.tls_cert_file, "tls_cert_file")
            keyfile = _readable(m.tls_key_file, "tls_key_file")
            _tls_context(certfile, keyfile)  # a bad or mismatched pair fails now, not at the first scrape
        username = env.get(ENV_USERNAME) or m.basic_auth_username
        password: str | None = None
        if m.basic_auth_password_file:
            path = _readable(m.basic_auth_password_file, "basic_auth_password_file")
            # One line; a trailing newline (echo, most editors) is not part of the password.
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            if not password:
                raise ConfigError(f"[metrics] basic_auth_password_file: {path} is empty")
        elif env.get(ENV_PASSWORD):
            password = env[ENV_PASSWORD]
        if username and password is None:
            raise ConfigError(
                "[metrics] basic_auth_username is set but there is no password: set basic_auth_password_file "
                f"or the {ENV_PASSWORD} environment variable"
            )
        if password is not None and not username:
            raise ConfigError(
                f"[metrics] a basic-auth password is given but no username: set basic_auth_username or {ENV_USERNAME}"
            )
        auth = BasicAuth(username, password) if username and password is not None else None
        return cls(host=m.host, port=m.port, certfile=certfile, keyfile=keyfile, auth=auth)


def _readable(path: str, key: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"[metrics] {key}: no such file: {path}")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"[metrics] {key}: cannot read {path} (permission denied)")
    return str(p)


def _tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"[metrics] cannot use tls_cert_file {certfile} with tls_key_file {keyfile}: {exc.__class__.__name__}: "
            f"{getattr(exc, 'reason', None) or exc}"
        ) from None
    return context


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log on stderr (the JSON logs are the process's output)."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """A WSGI server, a thread per connection; with TLS, the handshake happens in that thread."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return  # plain HTTP on the TLS port, a failed or stalled handshake: drop the connection
        try:
            super().finish_request(conn, client_address)
        finally:
            with contextlib.suppress(OSError):
                conn.close()


def start_metrics_server(endpoint: MetricsEndpoint, registry: CollectorRegistry) -> WSGIServer:
    """Serve ``registry`` on ``endpoint`` in a daemon thread; ``server.shutdown()`` stops it.
    ``endpoint.port`` 0 binds any free port (``server.server_port``)."""
    family = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    address_family, sockaddr = family[0], family[4]

    class Server(_MetricsServer):
        pass

    Server.address_family = address_family
    app: WSGIApp = make_wsgi_app(registry)
    if endpoint.auth is not None:
        app = endpoint.auth.wrap(app)
    server = make_server(str(sockaddr[0]), endpoint.port, app, Server, handler_class=_QuietHandler)
    if endpoint.certfile and endpoint.keyfile:
        server.tls = _tls_context(endpoint.certfile, endpoint.keyfile)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server
