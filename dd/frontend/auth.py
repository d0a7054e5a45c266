"""Who may talk to the gRPC port: TLS (optionally mutual) and an optional bearer token.

The token is read from a file (auth_token_file) rather than given on the
command line, because the supervisor hands its settings to its children in
argv, which every local user can read in /proc. It is compared with
hmac.compare_digest, so the time a refusal takes says nothing about how much
of a guess was right. The gRPC health service stays open without a token, so
load balancers and Kubernetes probes need no secret; everything else (the
Detector service, reflection) needs it. A refused call is answered
UNAUTHENTICATED before its message is even received.
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import stat
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from dd.config import ConfigError, ServerConfig

log = logging.getLogger("dd.frontend.auth")

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None for plaintext."""
    if not cfg.tls_cert:
        return None
    key = Path(cfg.tls_key).read_bytes()
    cert = Path(cfg.tls_cert).read_bytes()
    ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def check_security(cfg: ServerConfig) -> None:
    """Loads the TLS files and the token once, before any process starts, so that a key that does not
    match its certificate is one clear error and not a frontend crash loop."""
    if cfg.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls_cert {cfg.tls_cert} / tls_key {cfg.tls_key}: cannot load them as a "
                              f"certificate and its private key ({exc})") from None
        if cfg.tls_client_ca:
            try:
                ctx.load_verify_locations(cfg.tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"tls_client_ca {cfg.tls_client_ca}: not a PEM CA bundle ({exc})") from None
    if cfg.auth_token_file:
        read_token(cfg.auth_token_file)


def read_token(path: str) -> bytes:
    """The bearer token in `path` (surrounding whitespace removed)."""
    p = Path(path)
    try:
        token = p.read_bytes().strip()
        mode = stat.S_IMODE(os.stat(p).st_mode)
    except OSError as exc:
        raise ConfigError(f"auth_token_file {p}: cannot read it ({exc.strerror})") from exc
    if not token:
        raise ConfigError(f"auth_token_file {p} is empty; put the token in it (one line)")
    if len(token) < 16:
        raise ConfigError(f"auth_token_file {p}: the token is {len(token)} characters; use at least 16 "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if mode & 0o077:
        log.warning("auth_token_file %s is readable by group or others (mode %o); chmod 600 it", p, mode)
    return token


class TokenAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` metadata on every method but the health service."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    def _allowed(self, metadata: object) -> str | None:
        """None if the call carries the token, else why not (for the client's error message)."""
        for key, value in metadata or ():
            if key != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else bytes(value)
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() != b"bearer":
                return "the authorization metadata must be 'Bearer <token>'"
            # Both sides bytes: compare_digest takes time independent of where they differ.
            return None if hmac.compare_digest(token.strip(), self._token) else "invalid bearer token"
        return "missing bearer token: send metadata 'authorization: Bearer <token>'"

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        why = self._allowed(handler_call_details.invocation_metadata)
        if why is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without auth
        return _refusal(handler, why)


def _refusal(handler: grpc.RpcMethodHandler, why: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request at all.

    Whatever the method's shape, it is served as a client stream that is never read: gRPC reads a
    unary request whole before calling its handler, so an unauthenticated 60 MB message used to be
    received in full (and held) before it was refused. The call's status is all a client gets.
    """

    async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

    return grpc.stream_unary_rpc_method_handler(refuse)
