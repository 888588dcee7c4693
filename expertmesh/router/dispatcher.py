"""Dispatcher: one long-lived Forward stream per node; per MoE layer, one
request per node that has work, and the sum of the answers."""

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
import mlx.core as mx
import numpy as np

from .. import wire
from ..checkpoint import Identity
from ..errors import ExpertmeshError, OwnershipError, UnavailableError, from_rpc_error, from_status
from ..placement import Placement, describe
from ..security import Security
from ..serving import MAX_MESSAGE_BYTES, channel, layer_experts, split_address
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from .stats import RoutingStats

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


class Dispatcher:
    """Sends each MoE layer's routed tokens to live nodes holding their experts.

    Tokens of a replicated expert are spread evenly over its live copies:
    by token row, turning one copy further at each call of a layer (so one
    decoding sequence alternates too). When a node fails during a layer, only
    the (token, slot) pairs it had are sent again, to live copies; when no
    live node holds an expert, ``recover(missing)`` may load it onto live
    nodes (re-plan) or raise. ``switch`` changes the placement between layers.
    """

    def __init__(self, links: list[NodeLink], placement: Placement, timeout: float,
                 recover: Callable[[dict[int, list[int]]], None] | None = None,
                 stats: RoutingStats | None = None):
        by_name = {link.name: link for link in links}
        self.links = [by_name[n] for n in placement.nodes]
        self.placement = placement
        self.timeout = timeout
        self.recover = recover
        self.stats = stats
        self.retries = 0  # layers partly sent again after a node failed during them
        self._turns: dict[int, int] = {}  # layer -> calls so far, to rotate over copies
        self._layer_lock = threading.Lock()  # held for each layer: the placement changes between layers

    def switch(self, placement: Placement, timeout: float) -> None:
        """Route by ``placement`` from the next layer on (same nodes, same order).

        Raises:
            UnavailableError: the running layer did not finish within ``timeout``.
        """
        if not self._layer_lock.acquire(timeout=timeout):
            raise UnavailableError(f"the running layer did not finish within {timeout:g}s")
        try:
            self.placement = placement
        finally:
            self._layer_lock.release()

    def replace(self, link: NodeLink) -> None:
        """Send ``link.name``'s share to ``link`` from now on (a node that came back)."""
        self.links[self.placement.nodes.index(link.name)] = link

    def __call__(self, layer: int, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        with self._layer_lock:
            return self._layer(layer, x, inds, scores)

    def _layer(self, layer: int, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        shape, code = x.shape, wire.wire_dtype(x.dtype)
        hidden, ids, weights = _to_host(x, inds, scores)  # the one sync point of the layer; the rest is numpy
        out = _Sum(hidden.shape)
        todo = None  # the (token, slot) pairs left to compute; None: all of them
        served = None  # the node that answered each slot
        sent: list[tuple[int, int, int, float]] = []
        turn = self._turns[layer] = self._turns.get(layer, -1) + 1
        while True:  # each failed round takes a node out, until _choose finds none left
            node = self._choose(layer, ids, todo, turn)
            failed = self._exchange(layer, code, hidden, ids, weights, node, out, sent)
            if failed is None:  # mostly at once: every slot of the layer answered
                served = node if served is None else np.where(todo, node, served)
                break
            served = np.where(~failed, node, -1) if served is None else np.where(todo & ~failed, node, served)
            self.retries += 1
            todo = failed
        if self.stats is not None:
            self.stats.record_layer(layer, ids, served, sent)
        return wire.from_numpy(out.result(code), code).reshape(shape)

    def _choose(self, layer: int, ids: np.ndarray, todo: np.ndarray | None, turn: int) -> np.ndarray:
        """[T, k] node index per (token, slot) in ``todo`` (None: all) to
        compute, -1 elsewhere: the ((row + turn) mod copies)-th live holder of
        the expert."""
        holders = self.placement.owners[layer][ids]  # [T, k, R]
        if holders.shape[-1] == 1 and not any(link.down for link in self.links):  # one live copy of each
            node = holders[..., 0]
            if node.min() >= 0:
                return node if todo is None else np.where(todo, node, -1)
        todo = np.ones(ids.shape, bool) if todo is None else todo
        live = np.array([not link.down for link in self.links])
        ok = (holders >= 0) & live[np.maximum(holders, 0)]
        if (todo & ~ok.any(-1)).any():
            missing = self.placement.missing(live)
            if self.recover is not None:
                self.recover(missing)
                holders = self.placement.owners[layer][ids]
                ok = (holders >= 0) & live[np.maximum(holders, 0)]
            if (todo & ~ok.any(-1)).any():
                raise UnavailableError(f"no live node holds {describe(missing)}")
        count = ok.sum(-1)
        pick = (np.arange(ids.shape[0])[:, None] + turn) % np.maximum(count, 1)
        column = np.argmax(ok & (np.cumsum(ok, -1) - 1 == pick[..., None]), -1)
        node = np.take_along_axis(holders, column[..., None], -1)[..., 0]
        return np.where(todo, node, -1)

    def _exchange(self, layer, code, hidden, ids, weights, node, out, sent) -> np.ndarray | None:
        """One request per chosen node, answers added into ``out`` and their
        traffic to ``sent``; returns the (token, slot) pairs of nodes that
        failed (``None`` when none did)."""
        T = ids.shape[0]
        failed = None
        calls = []
        chosen = sorted({n for n in node.ravel().tolist() if n >= 0})
        for n in chosen:
            link = self.links[n]
            if len(chosen) == 1 and node.min() >= 0:  # one node has every slot
                mine, rows, req_ids, req_weights = None, None, ids, weights
            else:
                mine = node == n
                rows = None if T == 1 else np.flatnonzero(mine.any(axis=1))  # the tokens it gets
                if rows is not None and rows.size == T:
                    rows = None
                req_ids, req_weights = np.where(mine, ids, -1), np.where(mine, weights, 0.0)
                if rows is not None:
                    req_ids, req_weights = req_ids[rows], req_weights[rows]
            req = pb.ForwardRequest(
                request_id=next(_REQUEST_IDS), layer=layer,
                hidden=wire.encode_numpy(hidden if rows is None else hidden[rows], code),
                expert_ids=wire.encode_numpy(req_ids, pb.INT32),
                weights=wire.encode_numpy(req_weights, pb.FLOAT32),
            )
            try:
                calls.append((n, link, mine, rows, req.ByteSize(), time.perf_counter(), link.submit(req)))
            except UnavailableError as e:
                failed = self._note_failure(layer, link, e, mine, node, failed)
        for n, link, mine, rows, nbytes, t0, pending in calls:
            try:
                resp = pending.result(timeout=self.timeout)
            except UnavailableError as e:
                if not link.down:  # the node itself refused: no failover helps
                    raise
                failed = self._note_failure(layer, link, e, mine, node, failed)
                continue
            sent.append((n, nbytes, resp.ByteSize(), time.perf_counter() - t0))
            out.add(rows, wire.decode_numpy(resp.output, "output"), resp.output.dtype)
        return failed

    @staticmethod
    def _note_failure(layer, link, err, mine, node, failed) -> np.ndarray:
        """``failed`` with the slots of ``link`` (``mine``; ``None``: all that
        ``node`` chose) added."""
        mine = node >= 0 if mine is None else mine
        logger.warning("layer %d: %s failed (%s); sending its %d tokens to other holders", layer, link, err,
                       int(mine.any(axis=1).sum()))
        return mine if failed is None else failed | mine


def _to_host(x: mx.array, inds: mx.array, scores: mx.array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A layer's (hidden [T, H] as the wire carries it, expert ids [T, k]
    int32, weights [T, k] float32) on the host, after one evaluation. Each is
    read out as it is (a memoryview where it is contiguous): on the H200 a
    read-back costs ~17 µs, and packing the three into one buffer on the
    device costs more in ops than it saves (benchmarks/README.md)."""
    H, k = x.shape[-1], inds.shape[-1]
    mx.eval(x, inds, scores)
    return (wire.to_numpy(x).reshape(-1, H), np.asarray(inds).reshape(-1, k).astype(np.int32, copy=False),
            wire.to_float32(wire.to_numpy(scores), wire.wire_dtype(scores.dtype)).reshape(-1, k))


class _Sum:
    """A layer's answers: the one that covers every row kept as its bits, or
    several added in float32 (and rounded once, at the end)."""

    __slots__ = ("shape", "whole", "total")

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.whole: tuple[np.ndarray, int] | None = None
        self.total: np.ndarray | None = None

    def add(self, rows: np.ndarray | None, part: np.ndarray, code: int) -> None:
        if self.whole is None and self.total is None and rows is None and part.shape == self.shape:
            self.whole = (part, code)
            return
        if self.total is None:
            self.total = np.zeros(self.shape, np.float32)
            if self.whole is not None:
                self.total += wire.to_float32(*self.whole)
        self.total[slice(None) if rows is None else rows] += wire.to_float32(part, code)

    def result(self, code: int) -> np.ndarray:
        """The sum as ``code``'s carrier values."""
        if self.total is None and self.whole is not None and self.whole[1] == code:
            return self.whole[0]
        if self.total is None:
            self.total = np.zeros(self.shape, np.float32) if self.whole is None else wire.to_float32(*self.whole)
        return wire.from_float32(self.total, code)
