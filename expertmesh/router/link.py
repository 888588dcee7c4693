"""The router's transport to its nodes: everything that crosses the wire to one.

The interface, all the rest of the router uses:

    link = NodeLink(address, timeout, on_broken, security, request_limit, router_identity)
    link.get_info() / assign(...) / assign_stages(...) / measure(...) / release()   control calls, gRPC
    link.open_stream()                     the Forward exchange: data plane, gRPC stream beside it
    link.submit(request).result(t)         one request, made by expert_request / stage_request /
                                           release_request (each names its ``op``, under a new id)
    link.down, link.fail(err), link.close(graceful)

The Forward exchange goes over the node's data plane: ``wire``'s frames on a
TCP (or TLS) socket of its own, a ``DataPlaneSocket``, after the hello that
names the token, the router and its epoch. The node's "working" heartbeats
are read and skipped there, so a deadline bounds the node's silence and
``request_limit`` its work. The gRPC Forward stream stays open beside it so a
node's death is heard at once, and carries the requests of a node without
a data plane. The connection itself is ``dataplane.py`` here; the node's
side is ``expertmesh.nodes.dataplane``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import grpc
import mlx.core as mx
import numpy as np

from .. import wire
from ..checkpoint import Identity
from ..errors import ExpertmeshError, UnavailableError, from_rpc_error, from_status
from ..security import Security
from ..serving import channel, layer_experts, split_address
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from .dataplane import Closed, DataPlaneSocket

logger = logging.getLogger(__name__)

# (node name, its latest AssignProgress): a node's loading as it goes
AssignProgressCallback = Callable[[str, pb.AssignProgress], None]

# one increasing sequence per process, so a reply's id tells whether it is stale
_REQUEST_IDS = itertools.count(1)

# a node saying "working" for longer than this is taken to hang (the router's --request-limit)
REQUEST_LIMIT_S = 300.0


# --- the requests, one per operation, each under a new id ------------------------
def expert_request(layer: int, hidden: np.ndarray, code: "pb.DType", ids: np.ndarray,
                   weights: np.ndarray) -> "pb.ForwardRequest | wire.Framed":
    """Tokens of one MoE layer for a node's experts (wire-carrier arrays:
    hidden [T, H] of ``code``, ids [T, k] int32, weights [T, k] float32); a
    prompt's hidden travels as a ``wire.Framed`` tail."""
    request = pb.ForwardRequest(request_id=next(_REQUEST_IDS))
    op = request.expert
    op.layer = layer
    wire.encode_into(op.expert_ids, ids, pb.INT32)
    wire.encode_into(op.weights, weights, pb.FLOAT32)
    return wire.framed_tensor(request, ("expert", "hidden"), hidden, code)


def stage_request(layer: int, hidden: mx.array, sequences=(), right_padding=(),
                  trim: int = 0) -> "pb.ForwardRequest | wire.Framed":
    """One step of the stage span starting at ``layer`` ([B, T, H], evaluated;
    a prompt's travels as a ``wire.Framed`` tail, read from its memory)."""
    return stage_request_numpy(layer, wire.to_numpy(hidden), wire.wire_dtype(hidden.dtype), sequences,
                               right_padding, trim)


def stage_request_numpy(layer: int, hidden: np.ndarray, code: "pb.DType", sequences=(), right_padding=(),
                        trim: int = 0) -> "pb.ForwardRequest | wire.Framed":
    """``stage_request`` of hidden states as the wire carries them (``code``'s carrier values)."""
    request = pb.ForwardRequest(request_id=next(_REQUEST_IDS))
    op = request.stage
    op.layer, op.trim = layer, trim
    op.sequences.extend(sequences)
    op.right_padding.extend(right_padding)
    return wire.framed_tensor(request, ("stage", "hidden"), hidden, code)


def release_request(sequences) -> pb.ForwardRequest:
    """Free these sequences' KV caches on the node."""
    return pb.ForwardRequest(request_id=next(_REQUEST_IDS), release=pb.SequenceRelease(sequences=sorted(sequences)))


class NodeLink:
    """The router's connection to one node.

    ``on_broken(link)`` is called (from the stream's reader thread) when the
    Forward stream ends; from then on ``submit`` fails at once.
    """

    def __init__(self, address: str, timeout: float, on_broken: Callable[["NodeLink"], None] = lambda link: None,
                 security: Security = Security(), request_limit: float = REQUEST_LIMIT_S,
                 router_identity: pb.RouterIdentity | None = None):
        self.address = address
        self.router_identity = router_identity or pb.RouterIdentity()  # the router, to the node (shared by its links)
        self.epoch = 0  # of the node's hold for this router, from its last assignment
        self.security = security
        self.timeout = timeout
        self.request_limit = request_limit  # seconds a request may keep its node working
        self.on_broken = on_broken
        self.name = address
        self.info: pb.NodeInfo | None = None
        self.error = ""
        self._channel = channel(address, security)
        self.stub = pb_grpc.ExpertServiceStub(self._channel)
        self._requests: queue.SimpleQueue | None = None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._broken: ExpertmeshError | None = None
        self._reader: threading.Thread | None = None
        self.data_plane: DataPlaneSocket | None = None

    def __repr__(self):
        return f"node {self.address}" if self.name == self.address else f"node {self.name} ({self.address})"

    def get_info(self, timeout: float | None = None) -> pb.NodeInfo:
        try:
            self.info = self.stub.GetInfo(pb.GetInfoRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, repr(self)) from None
        if self.name == self.address:  # not named by the router yet
            self.name = self.info.name
        return self.info

    def assign(self, identity: Identity, experts: dict[int, list[int]], timeout: float,
               progress: AssignProgressCallback | None = None) -> None:
        request = pb.AssignRequest(config_hash=identity.config, weights_hash=identity.weights,
                                   experts=layer_experts(experts), router=self.router_identity)
        try:
            for update in self.stub.Assign(request, timeout=timeout):
                logger.debug("%r: loaded %d/%d bytes", self, update.loaded_bytes, update.total_bytes)
                if update.done:
                    self.epoch = update.epoch
                if progress is not None:
                    progress(self.name, update)
        except grpc.RpcError as e:
            raise from_rpc_error(e, repr(self)) from None
        self.get_info()  # what it holds and the memory that takes, for `cluster`

    def assign_stages(self, identity: Identity, spans: list[tuple[int, int]], timeout: float,
                      progress: Callable[[pb.AssignProgress], None] | None = None) -> None:
        """Have the node hold these spans of whole layers (pipeline stages);
        ``progress`` hears each layer it reads."""
        request = pb.AssignStagesRequest(config_hash=identity.config, weights_hash=identity.weights,
                                         stages=[pb.LayerSpan(start=a, end=b) for a, b in spans],
                                         router=self.router_identity)
        try:
            for update in self.stub.AssignStages(request, timeout=timeout):
                if update.done:
                    self.epoch = update.epoch
                if progress is not None:
                    progress(update)
        except grpc.RpcError as e:
            raise from_rpc_error(e, repr(self)) from None
        self.get_info()

    def measure(self, layer: int, timeout: float) -> pb.Measurement:
        """Time one whole layer on the node (the cost model's probe)."""
        try:
            m = self.stub.Measure(pb.MeasureRequest(layer=layer, router=self.router_identity), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e, repr(self)) from None
        self.epoch = m.epoch
        return m

    def _why_closed(self) -> str:
        """", taken over by ..." when the node now serves another router (a node
        drops the data plane of the router it was taken from)."""
        try:
            holder = self.stub.GetInfo(pb.GetInfoRequest(), timeout=1.0).router
        except grpc.RpcError:
            return ""
        if holder.id and holder.id != self.router_identity.id:
            return f": it was taken over by router {holder.id[:8]} at {holder.address}"
        return ""

    def release(self) -> None:
        """Tell the node this router is done with it (best effort: it may be down)."""
        if not self.router_identity.id:
            return
        try:
            self.stub.Release(pb.ReleaseRequest(router_id=self.router_identity.id, epoch=self.epoch), timeout=2)
        except grpc.RpcError as e:
            logger.debug("%r: release failed: %s", self, e)

    # --- the Forward exchange -------------------------------------------------
    def open_stream(self) -> None:
        """Open the gRPC Forward stream, which also tells at once when the node
        dies, and the data-plane socket when the node offers one; requests then
        travel on the socket."""
        with self._lock:
            self._requests = queue.SimpleQueue()
            self._broken = None
            self.error = ""
        if self.security.token and not self.info.token_required:
            logger.warning("%r accepts calls without the cluster token: start it with --token too", self)
        call = self.stub.Forward(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, args=(call,), daemon=True,
                                        name=f"forward-{self.address}")
        self._reader.start()
        if self.info.data_port:
            try:
                self.data_plane = self.dial_data_plane()
            except OSError as e:
                raise self.fail(UnavailableError(f"{self!r}: cannot open the data plane: {e}")) from None
            except ExpertmeshError as e:
                raise self.fail(e) from None

    def dial_data_plane(self) -> DataPlaneSocket:
        """A new data-plane connection, past TLS and the hello when the node wants them.

        Raises:
            OSError: unreachable, or the TLS handshake failed.
            AuthError: the node refused our token.
        """
        host, _ = split_address(self.address)
        hello = None
        if self.info.token_required or (self.epoch and self.router_identity.id):  # token; we hold it
            hello = pb.DataPlaneHello(token=self.security.token or "", router_id=self.router_identity.id,
                                      epoch=self.epoch)
        return DataPlaneSocket.dial(host, self.info.data_port, self.security, self.timeout, repr(self), hello)

    def _read(self, call) -> None:
        try:
            for resp in call:
                with self._lock:
                    fut = self._pending.pop(resp.request_id, None)
                if fut is not None:
                    fut.set_result(resp)
            err = UnavailableError(f"{self!r} closed its Forward stream")
        except grpc.RpcError as e:
            err = from_rpc_error(e, repr(self))
        self.fail(err)

    def fail(self, err: ExpertmeshError) -> ExpertmeshError:
        """Mark the link down (once: then ``on_broken``) and fail what waits on it."""
        with self._lock:
            first = self._broken is None
            if first:
                self._broken = err
            pending, self._pending = self._pending, {}
        if first:
            self.error = str(err)
        for fut in pending.values():
            fut.set_exception(err)
        if first:
            self.on_broken(self)
        return err

    @property
    def down(self) -> bool:
        return self._broken is not None

    def submit(self, request: "pb.ForwardRequest | wire.Framed"):
        """Send one request; the returned object's ``result(timeout)`` is the
        reply, or raises ``UnavailableError`` with the link failed when the node
        went silent for ``timeout`` (on either path). Its ``sent_bytes``, and
        after ``result`` its ``received_bytes``, are the two messages' sizes
        (taken from the data plane's framing: ``ByteSize`` serializes a
        message once more, ~0.5 ms for a 512-token layer's)."""
        with self._lock:
            broken = self._broken
        if broken is not None:
            raise UnavailableError(f"{self!r} is down ({broken}); its experts are unavailable until it is back")
        if self.data_plane is not None:
            try:
                sent = self.data_plane.send(request)
            except OSError as e:
                raise self.fail(UnavailableError(f"{self!r} is unreachable: {e}")) from None
            return _SocketReply(self, request.request_id, sent)
        request = wire.materialized(request)
        fut: Future = Future()
        with self._lock:
            self._pending[request.request_id] = fut
        self._requests.put(request)
        return _StreamReply(self, fut, request.ByteSize())

    def receive(self, request_id: int, timeout: float) -> pb.ForwardResponse:
        """The data plane's reply to ``request_id`` (see ``DataPlaneSocket.reply``).

        Raises:
            UnavailableError: the link failed (it is down from now on).
            ExpertmeshError: the node refused the request (the link stays up).
        """
        try:
            resp = self.data_plane.reply(request_id, timeout, self.request_limit)
        except Closed as e:
            raise self.fail(UnavailableError(f"{e}{self._why_closed()}")) from None
        except UnavailableError as e:
            raise self.fail(e) from None
        if resp.error_code:
            raise from_status(resp.error_code, resp.error, repr(self), raised="")
        return resp

    def close(self, graceful: bool = True) -> None:
        """End the Forward exchange (letting the node finish it unless not
        ``graceful``: a node that stopped answering), then the channel."""
        if self.data_plane is not None:
            self.data_plane.close()
        if self._requests is not None:
            self._requests.put(None)
            if graceful:
                self._reader.join(timeout=self.timeout)
        self._channel.close()


class _StreamReply:
    """A reply on the gRPC Forward stream (nodes without a data plane)."""

    __slots__ = ("link", "future", "sent_bytes", "received_bytes")

    def __init__(self, link: NodeLink, future: Future, sent_bytes: int):
        self.link, self.future, self.sent_bytes, self.received_bytes = link, future, sent_bytes, 0

    def result(self, timeout: float) -> pb.ForwardResponse:
        try:
            resp = self.future.result(timeout)
        except FutureTimeout:
            raise self.link.fail(UnavailableError(f"{self.link!r} did not answer within {timeout:g}s")) from None
        self.received_bytes = resp.ByteSize()
        return resp


class _SocketReply:
    __slots__ = ("link", "request_id", "sent_bytes", "received_bytes")

    def __init__(self, link: NodeLink, request_id: int, sent_bytes: int):
        self.link, self.request_id, self.sent_bytes, self.received_bytes = link, request_id, sent_bytes, 0

    def result(self, timeout: float) -> pb.ForwardResponse:
        resp = self.link.receive(self.request_id, timeout)
        self.received_bytes = self.link.data_plane.received
        return resp
