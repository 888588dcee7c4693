"""The router's side of a node's data plane: one connection, past TLS and the hello.

``NodeLink`` (``link.py``) sends its Forward exchange over one of these;
the node's side is ``expertmesh.nodes.dataplane``, the framing ``wire``'s.
Heartbeats: while a request computes, the node says "working" every
``HEARTBEAT_S``; they are read and skipped here, so that a deadline bounds
the node's silence and ``request_limit`` its work.
"""

from __future__ import annotations

import socket
import time

import grpc

from .. import wire
from ..errors import ExpertmeshError, OwnershipError, UnavailableError, from_status
from ..security import Security
from ..serving import MAX_MESSAGE_BYTES
from ..v1 import expertmesh_pb2 as pb


def recv_reply(sock: socket.socket, max_bytes: int = MAX_MESSAGE_BYTES) -> "pb.ForwardResponse | None":
    """The next ``ForwardResponse`` that is not a "still working" heartbeat;
    ``None`` when the peer closed."""
    while True:
        reply = wire.recv_frame(sock, pb.ForwardResponse, max_bytes)
        if reply is None or not reply.working:
            return reply


class DataPlaneSocket:
    """One data-plane connection to a node, past TLS and the hello."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self.received = 0  # bytes of the last reply ``reply`` returned

    @classmethod
    def dial(cls, host: str, port: int, security: Security, timeout: float, name: str,
             hello: pb.DataPlaneHello | None = None) -> "DataPlaneSocket":
        """Connect, with TLS when ``security`` has it, and say ``hello`` when given.

        Raises:
            OSError: unreachable, or the TLS handshake failed.
            OwnershipError: the node serves another router (or another epoch of ours).
            AuthError: the node refused our token.
        """
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if security.tls:
                sock = security.client_ssl_context().wrap_socket(sock, server_hostname=host)
            if hello is not None:
                wire.send_frame(sock, hello)
                welcome = wire.recv_frame(sock, pb.ForwardResponse, MAX_MESSAGE_BYTES)
                if welcome is None:
                    raise UnavailableError(f"{name} closed the data plane during the hello")
                if welcome.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                    raise OwnershipError(f"{name} refused the data plane: {welcome.error}")
                if welcome.error_code:
                    raise from_status(welcome.error_code, f"{name} refused the data plane: {welcome.error}", name,
                                      raised="")
        except BaseException:
            sock.close()
            raise
        return cls(sock, name)

    def send(self, request: "pb.ForwardRequest | wire.Framed") -> int:
        """Send ``request``; its bytes. Raises ``OSError`` when the connection is gone."""
        return wire.send_frame(self.sock, request)

    def reply(self, request_id: int, timeout: float, request_limit: float) -> pb.ForwardResponse:
        """The reply to ``request_id`` (an error the node answered included).
        Replies to older requests (left unread when another node failed that
        layer) are skipped, and so are heartbeats: ``timeout`` bounds the
        node's silence, ``request_limit`` the whole wait.

        Raises:
            UnavailableError: silent, hung, closed, or the stream is broken.
        """
        give_up = time.monotonic() + request_limit
        while True:
            left = give_up - time.monotonic()
            try:
                self.sock.settimeout(max(min(timeout, left), 0.001))
                resp, size = wire.recv_frame_sized(self.sock, pb.ForwardResponse, MAX_MESSAGE_BYTES)
            except socket.timeout:
                if left < timeout:
                    raise UnavailableError(f"{self.name} was still working on a request after {request_limit:g}s "
                                           "(--request-limit); taking it to hang") from None
                raise UnavailableError(f"{self.name} did not answer within {timeout:g}s") from None
            except (OSError, ExpertmeshError) as e:
                raise UnavailableError(f"{self.name} broke the data plane: {e}") from None
            if resp is None:
                raise Closed(f"{self.name} closed the data plane")
            if 0 < resp.request_id < request_id or resp.working:
                continue
            if resp.request_id != request_id and not resp.error_code:
                raise UnavailableError(f"{self.name} answered request {resp.request_id}, expected {request_id}")
            self.received = size
            return resp

    def ping(self, request_id: int, timeout: float) -> float:
        """Seconds of one empty round trip (``Ping``)."""
        tic = time.perf_counter()
        self.send(pb.ForwardRequest(request_id=request_id, ping=pb.Ping()))
        self.reply(request_id, timeout, timeout)
        return time.perf_counter() - tic

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "DataPlaneSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Closed(UnavailableError):
    """The node closed the data plane (the link says why, when it can)."""
