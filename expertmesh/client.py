"""Client SDK: talk to a router."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import grpc

from .errors import from_rpc_error
from .serving import channel
from .v1 import expertmesh_pb2 as pb
from .v1 import expertmesh_pb2_grpc as pb_grpc


@dataclass
class Piece:
    """One generated token and the text it adds."""

    text: str
    token: int
    finish_reason: str | None  # None until the last piece: "length" or "stop"
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float


@dataclass
class NodeView:
    name: str
    address: str
    state: str                       # "idle", "loading", "ready" or "down"
    memory_budget_bytes: int
    memory_used_bytes: int
    experts: dict[int, list[int]]    # layer -> global expert ids held
    error: str = ""


@dataclass
class ClusterView:
    model_id: str
    config_hash: str
    num_experts: int
    moe_layers: list[int]
    nodes: list[NodeView] = field(default_factory=list)


class Client:
    """A connection to an expertmesh router.

    Args:
        address: the router's ``HOST:PORT``.
        timeout: seconds allowed for each call (a whole generation included).

    Raises (from every method):
        UnavailableError: the router cannot be reached or a node went down.
        InvalidRequestError: the request was rejected (e.g. prompt too long).
    """

    def __init__(self, address: str, timeout: float = 600.0):
        self.address = address
        self.timeout = timeout
        self._channel = channel(address)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str, max_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None) -> Iterator[Piece]:
        """Stream the completion of ``prompt``, one ``Piece`` per token.

        ``temperature=0`` is greedy decoding; ``seed`` makes sampling repeatable.
        """
        request = pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed)
        call = self._stub.Generate(request, timeout=self.timeout)
        try:
            for r in call:
                yield Piece(r.text, r.token, r.finish_reason or None, r.prompt_tokens,
                            r.generation_tokens, r.generation_tps)
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"router {self.address}") from None
        finally:
            call.cancel()

    def cluster(self) -> ClusterView:
        """The nodes, what each holds, and their state."""
        try:
            c = self._stub.GetCluster(pb.GetClusterRequest(), timeout=min(self.timeout, 30.0))
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"router {self.address}") from None
        return ClusterView(
            c.model_id, c.config_hash, c.num_experts, list(c.moe_layers),
            [NodeView(n.name, n.address, pb.NodeState.Name(n.state).lower(), n.memory_budget_bytes,
                      n.memory_used_bytes, {le.layer: list(le.experts) for le in n.experts}, n.error)
             for n in c.nodes])
