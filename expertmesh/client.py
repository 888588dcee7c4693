"""Client SDK: talk to a router."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator

import grpc

from .errors import InvalidRequestError, UnavailableError, from_rpc_error
from .options import GenerationOptions
from .security import Security, default_token
from .serving import channel, split_address
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
    stages: list[tuple[int, int]] = field(default_factory=list)  # [start, end) spans of whole layers it runs


@dataclass
class ClusterView:
    model_id: str
    config_hash: str
    num_experts: int
    moe_layers: list[int]
    nodes: list[NodeView] = field(default_factory=list)


class _Call:
    """A reply's gRPC call, started at the first piece asked for; shared by
    a ``PieceStream`` and its pieces' generator (which must not hold the
    stream: dropping the stream then ends the call at once, not at the next
    garbage collection)."""

    __slots__ = ("start", "lock", "call", "cancelled")

    def __init__(self, start):
        self.start, self.lock, self.call, self.cancelled = start, threading.Lock(), None, False

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            call = self.call
        if call is not None:
            call.cancel()


def _pieces(state: _Call, address: str) -> Iterator[Piece]:
    with state.lock:
        if state.cancelled:
            return
        call = state.call = state.start()
    got = 0
    try:
        for r in call:
            got += 1
            yield Piece(r.text, r.token, r.finish_reason or None, r.prompt_tokens,
                        r.generation_tokens, r.generation_tps)
    except grpc.RpcError as e:
        err = from_rpc_error(e, f"router {address}")
        broke = str(err).startswith("cannot reach")  # not an UNAVAILABLE the router answered itself
        if broke and (got or "Cancelling all calls" in str(err)):  # it was stopped, or the connection lost
            raise UnavailableError(f"router {address} went away after {got} tokens of the reply (it was "
                                   f"stopped or the connection broke: {e.details()}); try again once it is "
                                   "back") from None
        raise err from None
    finally:
        call.cancel()


class PieceStream:
    """The pieces of one reply, as they come (an iterator over ``Piece``).
    The request goes to the router at the first ``next``. ``close()``, or
    dropping the stream, ends it on the router when the pieces are no longer
    wanted; ``cancel()`` does so from any thread, even while another waits
    for the next piece (which then raises).

    Raises (while iterating):
        UnavailableError: the router went away, or a node is down.
        InvalidRequestError: the router refused the request.
    """

    def __init__(self, start, address: str):
        self.address = address
        self._call = _Call(start)
        self._pieces = _pieces(self._call, address)

    def __iter__(self) -> "PieceStream":
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    def cancel(self) -> None:
        self._call.cancel()

    def close(self) -> None:
        self.cancel()
        self._pieces.close()


class Client:
    """A connection to an expertmesh router.

    Args:
        address: the router's ``HOST:PORT``.
        timeout: seconds allowed for each call (a whole generation included).
        token: the cluster token; default: the ``EXPERTMESH_TOKEN`` environment variable.
        tls_cert, tls_key, tls_ca: PEM files for mutual TLS (all three, or none).

    Raises:
        AuthError: a malformed token, or TLS files missing or unreadable.

    Raises (from every method):
        UnavailableError: the router cannot be reached or a node went down.
        InvalidRequestError: the request was rejected (e.g. prompt too long).
        AuthError: the router wants another token or certificate.
    """

    def __init__(self, address: str, timeout: float = 600.0, token: str | None = None,
                 tls_cert=None, tls_key=None, tls_ca=None):
        try:
            split_address(address)
        except InvalidRequestError:  # gRPC would dial port 443
            raise InvalidRequestError(f"router address {address!r} is not HOST:PORT, e.g. 127.0.0.1:50050",
                                      param="address") from None
        self.address = address
        self.timeout = timeout
        security = Security(default_token() if token is None else token or None, tls_cert, tls_key, tls_ca)
        self._channel = channel(address, security)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str, options: GenerationOptions | None = None, **changes) -> PieceStream:
        """Stream the completion of ``prompt``, one ``Piece`` per token.

        Args:
            prompt: the text to continue, as is (no chat template).
            options: how to sample and when to stop; greedy by default.
            **changes: fields of ``GenerationOptions`` that override ``options``,
                e.g. ``max_tokens=32, temperature=0.7, seed=1, stop=["\\n"]``.

        Raises:
            InvalidRequestError: a bad option, or a prompt longer than the context.
        """
        options = (options or GenerationOptions()).replace(**changes).validate()
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, not {type(prompt).__name__}", param="prompt")
        return self._stream(self._stub.Generate, pb.GenerateRequest(prompt=prompt, **options.to_fields()))

    def chat(self, messages: list[dict], options: GenerationOptions | None = None,
             chat_template_kwargs: dict | None = None, **changes) -> PieceStream:
        """Stream the assistant's reply to a conversation, one ``Piece`` per token.

        The router renders ``messages`` with the checkpoint's chat template, as
        mlx-lm does (``add_generation_prompt=True``).

        Args:
            messages: ``{"role": ..., "content": ...}`` dicts, oldest first.
            options: how to sample and when to stop; greedy by default.
            chat_template_kwargs: passed to the template, e.g. ``{"enable_thinking": False}``.
            **changes: fields of ``GenerationOptions`` that override ``options``.

        Raises:
            InvalidRequestError: a bad message or option, or a conversation
                longer than the context.
        """
        options = (options or GenerationOptions()).replace(**changes).validate()
        try:
            request = pb.ChatRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
                                     **options.to_fields())
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"messages must be {{'role': str, 'content': str}} dicts: {e}",
                                      param="messages") from None
        if chat_template_kwargs:
            try:
                request.chat_template_kwargs.update(chat_template_kwargs)
            except (AttributeError, TypeError, ValueError) as e:
                raise InvalidRequestError(f"chat_template_kwargs must be a dict of JSON values: {e}",
                                          param="chat_template_kwargs") from None
        return self._stream(self._stub.Chat, request)

    def _stream(self, method, request) -> "PieceStream":
        return PieceStream(lambda: method(request, timeout=self.timeout), self.address)

    def cluster(self) -> ClusterView:
        """The nodes, what each holds, and their state."""
        try:
            c = self._stub.GetCluster(pb.GetClusterRequest(), timeout=min(self.timeout, 30.0))
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"router {self.address}") from None
        return ClusterView(
            c.model_id, c.config_hash, c.num_experts, list(c.moe_layers),
            [NodeView(n.name, n.address, pb.NodeState.Name(n.state).lower(), n.memory_budget_bytes,
                      n.memory_used_bytes, {le.layer: list(le.experts) for le in n.experts}, n.error,
                      [(s.start, s.end) for s in n.stages])
             for n in c.nodes])

    def stats(self, reset: bool = False) -> pb.RouterStats:
        """What the router routed and served since it started or was last reset
        (the ``RouterStats`` message: per-layer expert and node load, per-node
        traffic and round trips, balance ratio, bytes per token).

        Args:
            reset: zero the router's counters after reading them.
        """
        try:
            return self._stub.GetStats(pb.RouterStatsRequest(reset=reset), timeout=min(self.timeout, 30.0))
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"router {self.address}") from None

    def rebalance(self, dry_run: bool = False, threshold: float = 0.0, min_tokens: int = 0
                  ) -> Iterator[pb.RebalanceProgress]:
        """Have the router move or copy experts to even the node load it has seen
        since the placement last changed, while generations run; streams each
        step (``RebalanceProgress``: planned balance and moves, then each node's
        loading, the switch, the drops, done; or skipped, with why).

        Args:
            dry_run: plan and report only.
            threshold: act only when the live balance ratio is below this (0: whenever it helps).
            min_tokens: act only after this many tokens since the last change.

        Raises:
            UnavailableError: a node is down or failed to load, or a rebalance is running.
            PlacementError: the nodes are too full to swap experts.
        """
        call = self._stub.Rebalance(pb.RebalanceRequest(dry_run=dry_run, threshold=threshold, min_tokens=min_tokens),
                                    timeout=self.timeout)
        try:
            yield from call
        except grpc.RpcError as e:
            raise from_rpc_error(e, f"router {self.address}") from None
        finally:
            call.cancel()
