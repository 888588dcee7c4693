"""Dispatcher: one long-lived Forward stream per node; per MoE layer, one
request per node that has work, and the sum of the answers."""

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
from ..errors import ExpertmeshError, UnavailableError, from_rpc_error
from ..placement import Placement
from ..serving import channel, layer_experts
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


class NodeLink:
    """The router's connection to one node.

    ``on_broken(link)`` is called (from the stream's reader thread) when the
    Forward stream ends; from then on ``submit`` fails at once.
    """

    def __init__(self, address: str, timeout: float, on_broken: Callable[["NodeLink"], None] = lambda link: None):
        self.address = address
        self.timeout = timeout
        self.on_broken = on_broken
        self.name = address
        self.info: pb.NodeInfo | None = None
        self.error = ""
        self._channel = channel(address)
        self.stub = pb_grpc.ExpertServiceStub(self._channel)
        self._requests: queue.SimpleQueue | None = None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._broken: ExpertmeshError | None = None
        self._reader: threading.Thread | None = None

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

    def assign(self, config_hash: str, experts: dict[int, list[int]], timeout: float) -> None:
        request = pb.AssignRequest(
            config_hash=config_hash,
            experts=layer_experts(experts))
        try:
            for progress in self.stub.Assign(request, timeout=timeout):
                logger.debug("%r: loaded %d/%d bytes", self, progress.loaded_bytes, progress.total_bytes)
        except grpc.RpcError as e:
            raise from_rpc_error(e, repr(self)) from None

    # --- the Forward stream ---------------------------------------------------
    def open_stream(self) -> None:
        with self._lock:
            self._requests = queue.SimpleQueue()
            self._broken = None
            self.error = ""
        call = self.stub.Forward(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, args=(call,), daemon=True,
                                        name=f"forward-{self.address}")
        self._reader.start()

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
        with self._lock:
            self._broken = err
            pending, self._pending = self._pending, {}
        self.error = str(err)
        for fut in pending.values():
            fut.set_exception(err)
        self.on_broken(self)

    @property
    def down(self) -> bool:
        return self._broken is not None

    def submit(self, request: pb.ForwardRequest) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._broken is not None:
                raise UnavailableError(f"{self!r} is down ({self._broken}); its experts are unavailable "
                                       "until it is back")
            self._pending[request.request_id] = fut
        self._requests.put(request)
        return fut

    def close(self, graceful: bool = True) -> None:
        """End the Forward stream (letting the node finish it unless not
        ``graceful``: a node that stopped answering), then the channel."""
        if self._requests is not None:
            self._requests.put(None)
            if graceful:
                self._reader.join(timeout=self.timeout)
        self._channel.close()


class Dispatcher:
    """Sends each MoE layer's routed tokens to the nodes holding their experts."""

    def __init__(self, links: list[NodeLink], placement: Placement, timeout: float):
        by_name = {link.name: link for link in links}
        self.links = [by_name[n] for n in placement.nodes]
        self.placement = placement
        self.timeout = timeout
        self._ids = itertools.count(1)

    def replace(self, link: NodeLink) -> None:
        """Send ``link.name``'s share to ``link`` from now on (a node that came back)."""
        self.links[self.placement.nodes.index(link.name)] = link

    def __call__(self, layer: int, x: mx.array, inds: mx.array, scores: mx.array) -> mx.array:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        k = inds.shape[-1]
        inds = inds.reshape(-1, k).astype(mx.int32)
        scores = scores.reshape(-1, k).astype(mx.float32)
        mx.eval(x, inds, scores)
        ids, weights = np.asarray(inds), np.asarray(scores)
        owner = self.placement.owners[layer][ids]
        T = ids.shape[0]
        calls = []
        for n, link in enumerate(self.links):
            mine = owner == n
            rows = np.flatnonzero(mine.any(axis=1))
            if rows.size == 0:
                continue
            every = rows.size == T
            req = pb.ForwardRequest(
                request_id=next(self._ids), layer=layer,
                hidden=wire.encode(x if every else x[mx.array(rows.astype(np.int32))]),
                expert_ids=wire.encode_numpy(np.where(mine, ids, -1)[rows], pb.INT32),
                weights=wire.encode_numpy(np.where(mine, weights, 0.0)[rows], pb.FLOAT32),
            )
            calls.append((link, None if every else rows, link.submit(req)))
        out = mx.zeros(x.shape, dtype=mx.float32)
        for link, rows, fut in calls:
            try:
                resp = fut.result(timeout=self.timeout)
            except FutureTimeout:
                raise UnavailableError(f"{link!r} did not answer layer {layer} within {self.timeout:g}s") from None
            part = wire.decode(resp.output, "output")
            out = out + part if rows is None else out.at[mx.array(rows.astype(np.int32))].add(part)
        return out.astype(x.dtype).reshape(shape)
