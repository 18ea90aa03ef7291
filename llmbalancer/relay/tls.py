"""HTTPS on the balancer's own port (``server.tls_cert``, ``server.tls_key``): one ``ssl.SSLContext`` for the
listening socket, so both legs (the lean front and aiohttp's server, which take the same connections) serve
HTTP/1.1 over TLS exactly as over plain TCP.

A reload reads the certificate and key again into the same context: connections made afterwards get the new
certificate, those open keep theirs. A pair that cannot be loaded (missing file, wrong key) is a
``ConfigError`` naming the key, at start-up and at a reload alike (the old pair then keeps serving).
"""

from __future__ import annotations

import ssl

from llmbalancer.config import ConfigError, Problem, ServerConfig


class Certificates:
    __slots__ = ("context",)

    def __init__(self, server: ServerConfig) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # HTTP/1.1 only, as over plain TCP
        _load(context, server)
        self.context = context

    def reload(self, server: ServerConfig) -> None:
        """Read the pair again (the same paths or new ones); ``ConfigError`` leaves the current pair in use."""
        _load(_fresh(), server)  # checked on a context nobody uses first
        _load(self.context, server)

    @staticmethod
    def wanted(server: ServerConfig) -> bool:
        return server.tls_cert is not None and server.tls_key is not None


def _fresh() -> ssl.SSLContext:
    return ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)


def _load(context: ssl.SSLContext, server: ServerConfig) -> None:
    assert server.tls_cert is not None and server.tls_key is not None
    for key, path in (("server.tls_cert", server.tls_cert), ("server.tls_key", server.tls_key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError([Problem(key, f"cannot read {path}: {exc.strerror}")]) from None
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([Problem("server.tls_cert", f"cannot load {server.tls_cert} with {server.tls_key}: {exc}")])\
            from None
