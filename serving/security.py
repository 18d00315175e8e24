"""TLS credentials, bearer-token authentication and secret handling shared by the services.

Everything here builds on grpc's own TLS (``grpc.ssl_server_credentials`` / ``ssl_channel_credentials``)
and the standard library; no cryptography is written by hand.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import grpc

log = logging.getLogger(__name__)

# Reachable without a token: probes (Kubernetes' native gRPC probes cannot send metadata) and
# reflection (it only describes the public API, whose protos ship with the package).
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")
MIN_SECRET_BYTES = 16


class ConfigError(ValueError):
    """A security setting is missing, inconsistent or unreadable; the message says which."""


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None
                       ) -> grpc.ServerCredentials | None:
    """TLS credentials for a server (None: plaintext); with ``client_ca`` clients must present a
    certificate that CA signed (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are "
                              "checked only over TLS)")
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together")
    pair = (read_file(key, "TLS key"), read_file(cert, "TLS certificate"))
    if client_ca:
        return grpc.ssl_server_credentials([pair], root_certificates=read_file(client_ca, "client CA"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def channel_credentials(ca: str | None = None, cert: str | None = None, key: str | None = None
                        ) -> grpc.ChannelCredentials:
    """TLS credentials for a client: ``ca`` verifies the server (None: the system's roots); ``cert`` and
    ``key`` are the client's own certificate, for servers that require one."""
    if bool(cert) != bool(key):
        raise ConfigError("a client certificate and its key go together")
    return grpc.ssl_channel_credentials(root_certificates=read_file(ca, "CA certificate") if ca else None,
                                        private_key=read_file(key, "client key") if key else None,
                                        certificate_chain=read_file(cert, "client certificate") if cert else None)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_refusal(host: str, tls: bool, allow_insecure: bool, env_prefix: str) -> str | None:
    """Why a worker must not start (None: it may): plaintext on an address other machines can reach
    lets anyone there call it, so that takes TLS or an explicit opt-in."""
    if tls or allow_insecure or is_loopback(host):
        return None
    return (f"refusing to serve plaintext gRPC on {host}, which other machines can reach: give --tls-cert and "
            f"--tls-key (and --tls-client-ca to accept only the gateway's certificate), listen on 127.0.0.1, or, "
            f"on a private network, pass --allow-insecure ({env_prefix}_ALLOW_INSECURE=1)")


def load_tokens(path: str | None, inline: str | None) -> list[str]:
    """Bearer tokens from a file (one per line; blank lines and ``#`` comments skipped) and from a
    comma- or whitespace-separated string (an environment variable)."""
    tokens = []
    if path:
        for line in read_file(path, "token file").decode().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    if inline:
        tokens.extend(t for t in inline.replace(",", " ").split() if t)
    return tokens


def load_secret(path: str | None, inline: str | None, what: str = "cache secret") -> bytes | None:
    """A shared secret from a file (a trailing newline dropped) or a string; None when neither is set."""
    if path:
        secret = read_file(path, what).rstrip(b"\r\n")
    elif inline:
        secret = inline.encode()
    else:
        return None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"the {what} has {len(secret)} bytes; use at least {MIN_SECRET_BYTES} "
                          "(e.g. `openssl rand -hex 32`)")
    return secret


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` parameter) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostport = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class BearerTokenAuth(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` naming one of ``tokens``
    (compared in constant time); health and reflection stay open. Others get UNAUTHENTICATED."""

    def __init__(self, tokens: list[str], open_prefixes: tuple[str, ...] = OPEN_METHOD_PREFIXES):
        if not tokens:
            raise ConfigError("token authentication needs at least one token")
        self._tokens = [t.encode() for t in tokens]
        self._open = open_prefixes

    def _problem(self, metadata) -> str | None:
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "this gateway needs a token: send the metadata 'authorization: Bearer <token>'"
        scheme, _, token = (values[0] if isinstance(values[0], str) else values[0].decode()).strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "the authorization metadata must read 'Bearer <token>'"
        given = token.strip().encode()
        if not any([hmac.compare_digest(given, t) for t in self._tokens]):  # a list: every token compared
            return "the bearer token is not valid"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open):
            return handler
        problem = self._problem(details.invocation_metadata)
        if problem is None:
            return handler
        log.warning("call refused", extra={"method": details.method, "reason": problem})
        return _refusing(handler, problem)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED with ``message``."""

    async def refuse(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(_request, context):  # an async generator, as stream wrappers (tracing) iterate it
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse_stream if handler.response_streaming else refuse,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
