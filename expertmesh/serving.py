"""Building gRPC servers and channels the same way for nodes and the router."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .errors import InvalidRequestError, UnavailableError
from .v1 import expertmesh_pb2 as pb

PROTOCOL_VERSION = 1

# A [T, H] bfloat16 batch of 4096 tokens at H=7168 is ~58 MB; allow that.
MAX_MESSAGE_BYTES = 64 << 20
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def create_server(address: str, register, service_names: list[str], workers: int = 16):
    """Bind a server on ``address`` with health and reflection.

    ``register(server)`` adds the servicers. Returns ``(server, port, health)``.

    Raises:
        UnavailableError: the address cannot be bound.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=_OPTIONS)
    register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in service_names]
    reflection.enable_server_reflection(names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        raise UnavailableError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise UnavailableError(f"cannot listen on {address}")
    for name in names + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, port, health_servicer


def set_serving(health_servicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [""] + [s.full_name for s in pb.DESCRIPTOR.services_by_name.values()]:
        health_servicer.set(name, status)


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=_OPTIONS)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port).

    Raises:
        InvalidRequestError: not of the form host:port.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidRequestError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def layer_experts(held: dict[int, list[int]]) -> list[pb.LayerExperts]:
    return [pb.LayerExperts(layer=l, experts=e) for l, e in sorted(held.items())]
