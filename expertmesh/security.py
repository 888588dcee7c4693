"""Who may talk to a mesh: the cluster token and mutual TLS.

``Security`` is one value shared by nodes, the router and clients. With a
token every gRPC call carries ``authorization: Bearer <token>`` and servers
answer calls without it ``UNAUTHENTICATED`` (``grpc.health.v1.Health`` stays
open, so load balancers can probe); the data plane wants a ``DataPlaneHello``
with the token as its first frame. With TLS files every server asks for a
client certificate signed by the CA, and the data plane is TLS too.
"""

from __future__ import annotations

import collections
import functools
import hmac
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import AuthError

TOKEN_ENV = "EXPERTMESH_TOKEN"
_METADATA_KEY = "authorization"
_SCHEME = "Bearer "
# Open without a token: liveness probes carry no credentials and learn only SERVING or not.
OPEN_METHODS = ("/grpc.health.v1.Health/",)
NO_TOKEN = f"no cluster token given: pass --token or set {TOKEN_ENV}"
WRONG_TOKEN = "wrong cluster token"


@dataclass(frozen=True)
class Security:
    """The cluster token and TLS files of one process (all optional).

    Raises:
        AuthError: a token that cannot travel in a header, only some of the
            three TLS files, or one that cannot be read.
    """

    token: str | None = None      # shared by every node, router and client of the mesh
    tls_cert: Path | None = None  # this process's certificate (PEM), for serving and for calling
    tls_key: Path | None = None   # its private key (PEM)
    tls_ca: Path | None = None    # the CA that signed every certificate of the mesh (PEM)

    def __post_init__(self):
        if self.token is not None and not (self.token.isascii() and self.token.isprintable() and self.token.strip()):
            raise AuthError("the cluster token must be printable ASCII and not blank")
        given = [f for f in ("tls_cert", "tls_key", "tls_ca") if getattr(self, f) is not None]
        if given and len(given) != 3:
            raise AuthError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        if self.tls:  # unreadable or mismatched files fail here, in one line, before anything listens
            self._load(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))

    @classmethod
    def from_args(cls, args) -> "Security":
        """From the ``--token`` and ``--tls-*`` flags (see ``commands.security_arguments``)."""
        return cls(args.token or None, args.tls_cert, args.tls_key, args.tls_ca)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @functools.cached_property
    def _pem(self) -> tuple[bytes, bytes, bytes]:
        """(certificate, key, CA) bytes."""
        out = []
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-ca", self.tls_ca)):
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise AuthError(f"{flag} {path}: {e.strerror}") from None
            if b"-----BEGIN " not in data:
                raise AuthError(f"{flag} {path} is not a PEM file")
            out.append(data)
        return tuple(out)

    # --- the token ------------------------------------------------------------------
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((_METADATA_KEY, _SCHEME + self.token),) if self.token else ()

    def token_error(self, given: str | None) -> str:
        """Why ``given`` is not this cluster's token ("" when it is, or none is needed)."""
        if not self.token:
            return ""
        if not given:
            return NO_TOKEN
        return "" if hmac.compare_digest(given.encode(), self.token.encode()) else WRONG_TOKEN

    # --- gRPC -----------------------------------------------------------------------
    def server_interceptors(self) -> list[grpc.ServerInterceptor]:
        return [_TokenCheck(self)] if self.token else []

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self._pem
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel(self, address: str, options: list) -> grpc.Channel:
        """A channel to ``address`` that presents our certificate and token."""
        if self.tls:
            cert, key, ca = self._pem
            creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            ch = grpc.secure_channel(address, creds, options=options)
        else:
            ch = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(ch, _TokenSender(self.metadata())) if self.token else ch

    # --- plain sockets (the data plane, the HTTP API) ---------------------------------
    def server_ssl_context(self, client_certs: bool = True) -> ssl.SSLContext:
        """TLS for a listening socket; ``client_certs`` makes it mutual."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._load(ctx)
        if client_certs:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its host name
        self._load(ctx)
        return ctx

    def _load(self, ctx: ssl.SSLContext) -> None:
        cert, key, ca = self._pem
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cadata=ca.decode(errors="replace"))
        except ssl.SSLError as e:
            raise AuthError(f"--tls-ca {self.tls_ca} holds no usable CA certificate ({e.reason or e})") from None
        try:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        except ssl.SSLError as e:
            raise AuthError(f"--tls-cert {self.tls_cert} and --tls-key {self.tls_key} do not go together: "
                            f"{e.reason}") from None


def bearer(header: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value."""
    if header and header.startswith(_SCHEME):
        return header[len(_SCHEME):].strip()
    return None


def default_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


class _TokenCheck(grpc.ServerInterceptor):
    """Answers calls without the cluster token UNAUTHENTICATED, except OPEN_METHODS."""

    def __init__(self, security: Security):
        self.security = security

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        given = bearer(dict(details.invocation_metadata or ()).get(_METADATA_KEY))
        why = self.security.token_error(given)
        if not why:
            return handler

        def deny(request, context):
            context.set_trailing_metadata((("expertmesh-error", AuthError.__name__),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        return kind[handler.request_streaming, handler.response_streaming](deny)


class _Details(collections.namedtuple("_Details", "method timeout metadata credentials wait_for_ready compression"),
               grpc.ClientCallDetails):
    pass


class _TokenSender(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the token to every call of a channel."""

    def __init__(self, metadata):
        self.metadata = tuple(metadata)

    def _with_token(self, d):
        return _Details(d.method, d.timeout, tuple(d.metadata or ()) + self.metadata, d.credentials,
                        d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary
