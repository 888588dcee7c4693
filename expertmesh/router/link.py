"""NodeLink: the router's transport to one node.

The control calls (GetInfo, Assign, AssignStages, Measure, Release) go over
gRPC; the Forward exchange over the node's data plane (length-prefixed frames
on a TCP socket, after the hello that names the token, the router and its
epoch), with the gRPC Forward stream kept open beside it so a node's death is
heard at once. The dispatcher and the stage runtime use a link through
``submit`` and the reply's ``result``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import grpc

from .. import wire
from ..checkpoint import Identity
from ..errors import ExpertmeshError, OwnershipError, UnavailableError, from_rpc_error, from_status
from ..security import Security
from ..serving import MAX_MESSAGE_BYTES, channel, layer_experts, split_address
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# (node name, its latest AssignProgress): a node's loading as it goes
AssignProgressCallback = Callable[[str, pb.AssignProgress], None]

# one increasing sequence per process, so a reply's id tells whether it is stale
_REQUEST_IDS = itertools.count(1)

# a node saying "working" for longer than this is taken to hang (the router's --request-limit)
REQUEST_LIMIT_S = 300.0


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
        self._sock: socket.socket | None = None

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
                self._sock = self.dial_data_plane()
            except OSError as e:
                raise self.fail(UnavailableError(f"{self!r}: cannot open the data plane: {e}")) from None
            except ExpertmeshError as e:
                raise self.fail(e) from None

    def dial_data_plane(self) -> socket.socket:
        """A new data-plane socket, past TLS and the hello when the node wants them.

        Raises:
            OSError: unreachable, or the TLS handshake failed.
            AuthError: the node refused our token.
        """
        host, _ = split_address(self.address)
        sock = socket.create_connection((host, self.info.data_port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if self.security.tls:
                sock = self.security.client_ssl_context().wrap_socket(sock, server_hostname=host)
            if self.info.token_required or (self.epoch and self.router_identity.id):  # token; we hold it
                wire.send_frame(sock, pb.DataPlaneHello(token=self.security.token or "", router_id=self.router_identity.id,
                                                        epoch=self.epoch))
                welcome = wire.recv_frame(sock, pb.ForwardResponse, MAX_MESSAGE_BYTES)
                if welcome is None:
                    raise UnavailableError(f"{self!r} closed the data plane during the hello")
                if welcome.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]:
                    raise OwnershipError(f"{self!r} refused the data plane: {welcome.error}")
                if welcome.error_code:
                    raise from_status(welcome.error_code, f"{self!r} refused the data plane: {welcome.error}", repr(self),
                                      raised="")
        except BaseException:
            sock.close()
            raise
        return sock

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

    def submit(self, request: pb.ForwardRequest):
        """Send one request; the returned object's ``result(timeout)`` is the
        reply, or raises ``UnavailableError`` with the link failed when the node
        went silent for ``timeout`` (on either path)."""
        with self._lock:
            broken = self._broken
        if broken is not None:
            raise UnavailableError(f"{self!r} is down ({broken}); its experts are unavailable until it is back")
        if self._sock is not None:
            try:
                wire.send_frame(self._sock, request)
            except OSError as e:
                raise self.fail(UnavailableError(f"{self!r} is unreachable: {e}")) from None
            return _SocketReply(self, request.request_id)
        fut: Future = Future()
        with self._lock:
            self._pending[request.request_id] = fut
        self._requests.put(request)
        return _StreamReply(self, fut)

    def receive(self, request_id: int, timeout: float) -> pb.ForwardResponse:
        """The reply to ``request_id``. Replies to older requests (left unread
        when another node failed that layer) are skipped, and so are the
        node's "still working" heartbeats: ``timeout`` bounds its silence,
        ``request_limit`` the whole wait."""
        give_up = time.monotonic() + self.request_limit
        while True:
            left = give_up - time.monotonic()
            try:
                self._sock.settimeout(max(min(timeout, left), 0.001))
                resp = wire.recv_frame(self._sock, pb.ForwardResponse, MAX_MESSAGE_BYTES)
            except socket.timeout:
                if left < timeout:
                    raise self.fail(UnavailableError(
                        f"{self!r} was still working on a request after {self.request_limit:g}s "
                        "(--request-limit); taking it to hang")) from None
                raise self.fail(UnavailableError(f"{self!r} did not answer within {timeout:g}s")) from None
            except (OSError, ExpertmeshError) as e:
                raise self.fail(UnavailableError(f"{self!r} broke the data plane: {e}")) from None
            if resp is None:
                raise self.fail(UnavailableError(f"{self!r} closed the data plane{self._why_closed()}"))
            if 0 < resp.request_id < request_id or resp.working:
                continue
            if resp.error_code:
                raise from_status(resp.error_code, resp.error, repr(self), raised="")
            if resp.request_id != request_id:
                raise self.fail(UnavailableError(
                    f"{self!r} answered request {resp.request_id}, expected {request_id}"))
            return resp

    def close(self, graceful: bool = True) -> None:
        """End the Forward exchange (letting the node finish it unless not
        ``graceful``: a node that stopped answering), then the channel."""
        if self._sock is not None:
            self._sock.close()
        if self._requests is not None:
            self._requests.put(None)
            if graceful:
                self._reader.join(timeout=self.timeout)
        self._channel.close()


class _StreamReply:
    """A reply on the gRPC Forward stream (nodes without a data plane)."""

    __slots__ = ("link", "future")

    def __init__(self, link: NodeLink, future: Future):
        self.link, self.future = link, future

    def result(self, timeout: float) -> pb.ForwardResponse:
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            raise self.link.fail(UnavailableError(f"{self.link!r} did not answer within {timeout:g}s")) from None


class _SocketReply:
    __slots__ = ("link", "request_id")

    def __init__(self, link: NodeLink, request_id: int):
        self.link, self.request_id = link, request_id

    def result(self, timeout: float) -> pb.ForwardResponse:
        return self.link.receive(self.request_id, timeout)
