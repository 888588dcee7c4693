"""The data plane: Forward as length-prefixed protobuf frames over plain TCP.

gRPC's Python stack costs several hundred microseconds per message; a MoE
layer of a decoded token is one small message each way, so the hot path uses
a socket per router connection instead (benchmarks/README.md has the
figures). gRPC ``Forward`` stays for tools and as the fallback. Each
connection is served by an ``MLXWorker`` of its own, which runs the experts
itself (no thread hand-off on the hot path).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from .. import wire
from ..errors import ExpertmeshError, status_code
from ..serving import MAX_MESSAGE_BYTES
from ..v1 import expertmesh_pb2 as pb
from ..worker import MLXWorker

logger = logging.getLogger(__name__)

Handler = Callable[[pb.ForwardRequest], pb.ForwardResponse]


class DataPlane:
    def __init__(self, hosts: list[str], handle: Handler, max_bytes: int = MAX_MESSAGE_BYTES):
        """Listen on every one of ``hosts``, on one port (the first free one)."""
        self._listeners: list[socket.socket] = []
        self.port = 0
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listeners.append(socket.create_server((host, self.port), family=family))
            self.port = self._listeners[0].getsockname()[1]
        self._handle = handle
        self._max_bytes = max_bytes
        self._conns: set[socket.socket] = set()
        self._serving: list = []  # futures of the connection loops
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> "DataPlane":
        self._acceptors = [threading.Thread(target=self._accept, args=(listener,), name="dataplane-accept",
                                            daemon=True) for listener in self._listeners]
        for t in self._acceptors:
            t.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # listener closed
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            worker = MLXWorker(f"dataplane-{peer[0]}:{peer[1]}")
            with self._lock:
                self._serving.append(worker.submit(self._serve, conn, worker))

    def _serve(self, conn: socket.socket, worker: MLXWorker) -> None:
        try:
            while True:
                try:
                    req = wire.recv_frame(conn, pb.ForwardRequest, self._max_bytes)
                except ExpertmeshError as e:  # oversized or unparsable: the stream is lost
                    wire.send_frame(conn, pb.ForwardResponse(error_code=status_code(e).value[0], error=str(e)))
                    return
                if req is None:
                    return
                try:
                    resp = self._handle(req)
                except ExpertmeshError as e:
                    resp = pb.ForwardResponse(request_id=req.request_id, error_code=status_code(e).value[0],
                                              error=f"request {req.request_id}: {e}")
                wire.send_frame(conn, resp)
        except OSError:
            pass  # peer went away, or stop() shut the socket
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
            worker.release()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        for listener in self._listeners:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
            except OSError:
                pass
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._acceptors:
            t.join(timeout=10)
        with self._lock:
            serving = list(self._serving)
        for fut in serving:
            fut.result(timeout=10)
