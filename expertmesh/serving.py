"""Building gRPC servers and channels the same way for nodes and the router."""

from __future__ import annotations

import os
import socket
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import InvalidRequestError, UnavailableError
from .security import Security
from .v1 import expertmesh_pb2 as pb

PROTOCOL_VERSION = 1

# Data plane: a node computing a request for longer than this says it is
# still working (ForwardResponse.working) at least this often, so a router's
# deadline can bound silence rather than work.
HEARTBEAT_S = 0.5

# A [T, H] bfloat16 batch of 4096 tokens at H=7168 is ~58 MB; allow that.
MAX_MESSAGE_BYTES = 64 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# A peer that vanishes without closing its connections (host unplugged) is
# noticed by keepalive pings: within KEEPALIVE_S + KEEPALIVE_TIMEOUT_S.
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 10, 5
_CHANNEL_OPTIONS = _OPTIONS + [
    ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # a fresh channel to a node that came back must not inherit the old one's backoff
    ("grpc.use_local_subchannel_pool", 1),
]
_SERVER_OPTIONS = _OPTIONS + [
    ("grpc.so_reuseport", 0),  # a second node on a taken port must fail, not share it
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_ping_strikes", 0),
]


def create_server(address: str | list[str], register, service_names: list[str], workers: int = 16,
                  security: Security = Security()):
    """Bind a server on ``address`` (or on several, one port for all) with health and reflection,
    asking callers for ``security``'s token and client certificate.

    ``register(server)`` adds the servicers. Returns ``(server, port, health)``.

    Raises:
        UnavailableError: an address cannot be bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_SERVER_OPTIONS,
                         interceptors=security.server_interceptors())
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in service_names]
    reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    first, *more = [address] if isinstance(address, str) else address
    port = _bind(server, first, security)
    for extra in more:
        _bind(server, join_address(split_address(extra)[0], port), security)
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port, health_servicer


def _bind(server: grpc.Server, address: str, security: Security) -> int:
    host, port = split_address(address)
    if port:  # say "in use" in one line (gRPC would log its own lines and say less)
        try:
            socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET).close()
        except OSError as e:
            raise UnavailableError(f"cannot listen on {address}: {os.strerror(e.errno) if e.errno else e}") from None
    try:
        if security.tls:
            port = server.add_secure_port(address, security.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise UnavailableError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise UnavailableError(f"cannot listen on {address}")
    return port


def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [""] + [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]:
        health_servicer.set(name, status)


def channel(address: str, security: Security = Security()) -> grpc.Channel:
    return security.channel(address, _CHANNEL_OPTIONS)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port).

    Raises:
        InvalidRequestError: not of the form host:port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidRequestError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """(host, port) -> 'host:port', bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def layer_experts(held: dict[int, list[int]]) -> list[pb.LayerExperts]:
    return [pb.LayerExperts(layer=l, experts=e) for l, e in sorted(held.items())]
