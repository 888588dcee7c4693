"""The node's side of the data plane: ``ForwardRequest`` frames over plain TCP.

gRPC's Python stack costs several hundred microseconds per message; a MoE
layer of a decoded token is one small message each way, so the hot path uses
a socket per router connection instead (benchmarks/README.md has the
figures). gRPC ``Forward`` stays for tools and as the fallback. Framing is
``wire``'s; what each request does is ``NodeCore.forward``'s.

Threads, four kinds: an acceptor per listening address; one ticker for the
whole data plane (heartbeats, hello deadlines); a short-lived hello thread per
connection not admitted yet; and an ``MLXWorker`` per admitted connection,
which reads its requests, runs them itself (no thread hand-off on the hot
path), writes the replies, and after each runs ``after`` (a span's next step built ahead).

Admission: with TLS files a connection is TLS with client certificates; with
a cluster token, or while a router holds the node, its first frame must be a
``DataPlaneHello`` naming the token, the router and its epoch. Both are
checked once, before any request, on the connection's hello thread, within
``HELLO_TIMEOUT_S`` in all (the ticker shuts slower ones). Past
``MAX_UNADMITTED`` waiting connections the oldest is dropped for each new
one, so strangers that connect and say nothing cost the node no MLX thread
and a bounded number of others, and cannot keep a router that says its hello
at once from getting in.

Bounds: frames are read into memory as their bytes arrive
(``wire.recv_exact``), not as their length prefix claims, and none is longer
than ``max_bytes``. At most ``MAX_SERVED`` admitted connections are served at
once (the least recently active is dropped for a new one), and nothing of a
connection is kept once it closes.

Heartbeats: while a request computes for longer than ``HEARTBEAT_S``, the
ticker sends ``ForwardResponse(working=True)`` every ``HEARTBEAT_S``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

import grpc

from expertmesh import wire
from expertmesh.errors import AuthError, ExpertmeshError, OwnershipError, status_code
from expertmesh.security import Security
from expertmesh.serving import HEARTBEAT_S, MAX_MESSAGE_BYTES
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.worker import MLXWorker

logger = logging.getLogger(__name__)

Handler = Callable[[pb.ForwardRequest], "pb.ForwardResponse | wire.Framed"]  # a Framed one: see wire.Framed

HELLO_TIMEOUT_S = 10.0  # a connection that has not authenticated by then is dropped
MAX_UNADMITTED = 64  # past this many connections waiting for their hello, the oldest is dropped
MAX_SERVED = 16      # admitted connections served at once (an MLX thread each); a router needs one or two
_HELLO_BYTES = 4096
_DRAIN_S, _WORKER_WAIT_S = 1.0, 2.0  # reading a refused peer's unread frames; waiting for a dropped one's worker


class _Beat:
    """An admitted connection's outgoing frames, under one lock: its replies
    (from its own worker) and, while a request computes for longer than
    ``HEARTBEAT_S``, the ticker's ``ForwardResponse(working=True)`` every
    ``HEARTBEAT_S``, so that the peer's deadline measures the node's silence,
    not its work. The hot path only notes the request (no lock, no wake-up).
    A heartbeat goes out only while the request still computes: the
    connection's own thread is then not reading (a TLS socket has one user at
    a time)."""

    __slots__ = ("conn", "current", "lock", "loop")

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.current: tuple[int, float] | None = None  # (request id, last word) of the request computing now
        self.lock = threading.Lock()
        self.loop = None  # the future of the connection's serving loop, on its worker

    def send(self, reply: pb.ForwardResponse) -> int:
        """Send ``reply``; its bytes."""
        with self.lock:
            self.current = None
            return wire.send_frame(self.conn, reply)

    def beat(self, now: float) -> None:
        """Say "working" when the request computing now was silent for most of a period (the ticker's call)."""
        current = self.current
        if current is None or now - current[1] < 0.8 * HEARTBEAT_S or not self.lock.acquire(blocking=False):
            return  # nothing computes, it spoke lately, or its reply is going out now
        try:
            if self.current is current:
                self.conn.settimeout(HEARTBEAT_S)  # a peer that reads nothing must not hold up the ticker
                wire.send_frame(self.conn, pb.ForwardResponse(request_id=current[0], working=True))
                self.conn.settimeout(None)
                self.current = (current[0], time.monotonic())
        except Exception:  # noqa: BLE001 closed, reset, stuck, or shut by stop(): the stream is lost
            _shut(self.conn)  # its own thread sees it and ends
        finally:
            self.lock.release()


class DataPlane:
    def __init__(self, hosts: list[str], handle: Handler, max_bytes: int = MAX_MESSAGE_BYTES,
                 security: Security = Security(), hello_wanted: Callable[[], bool] = lambda: False,
                 hello_error: Callable[[pb.DataPlaneHello], str] = lambda hello: "",
                 count: Callable[[int, int], None] = lambda received, sent: None,
                 after: Callable[[], None] = lambda: None):
        """Listen on every one of ``hosts``, on one port (the first free one).

        While ``hello_wanted()`` (the node serves a router), a connection's
        hello must also satisfy ``hello_error`` (returns why not, or "").
        ``count(request bytes, reply bytes)`` hears each exchange's traffic; ``after()``
        runs on the connection's thread after each reply (it must not raise)."""
        self._listeners: list[socket.socket] = []
        self.port = 0
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._listeners.append(socket.create_server((host, self.port), family=family))
            self.port = self._listeners[0].getsockname()[1]
        self._handle = handle
        self._count, self._after = count, after
        self._max_bytes = max_bytes
        self._security = security
        self._tls = security.server_ssl_context() if security.tls else None
        self._needs_hello = self._tls is not None or bool(security.token)  # TLS handshake and/or token hello
        self._hello_wanted, self._hello_error = hello_wanted, hello_error  # the router holding the node
        self._conns: set[socket.socket] = set()
        self._serving: dict[socket.socket, _Beat] = {}    # admitted connection -> its outgoing frames and loop
        self._active: dict[socket.socket, float] = {}     # admitted connection -> when its last frame came
        self._idle_workers: list[MLXWorker] = []          # of ended connections, for the next ones
        self._workers = 0                                 # MLX workers borrowed, idle or serving: <= MAX_SERVED
        # connections waiting for their TLS handshake and hello: thread -> [socket, accepted at], oldest first
        self._admitting: dict[threading.Thread, list] = {}
        self._hello_threads: set[threading.Thread] = set()  # those threads, and the dropped ones until they end
        self._lock = threading.Condition()  # notified when a worker goes idle, and on stop()
        self._stopping = threading.Event()  # set (under the lock) by stop()
        self._full = False  # MAX_UNADMITTED reached (logged once per episode)
        self._crowded = False  # MAX_SERVED reached (logged once per episode)

    @property
    def unadmitted(self) -> int:
        """Connections waiting for their TLS handshake or hello."""
        with self._lock:
            return len(self._admitting)

    def join_admissions(self, timeout: float) -> None:
        """Wait until the connections now waiting for their hello were admitted or dropped."""
        with self._lock:
            admitting = list(self._hello_threads)
        deadline = time.monotonic() + timeout
        for t in admitting:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def start(self) -> "DataPlane":
        self._acceptors = [threading.Thread(target=self._accept, args=(listener,), name="dataplane-accept",
                                            daemon=True) for listener in self._listeners]
        self._acceptors.append(threading.Thread(target=self._tick, name="dataplane-ticker", daemon=True))
        for t in self._acceptors:
            t.start()
        return self

    def _tick(self) -> None:
        """The data plane's one timer, five times per ``HEARTBEAT_S``: heartbeats
        of requests that compute long, and the shutting of connections that took
        longer than ``HELLO_TIMEOUT_S`` in all to be admitted (a peer trickling
        its handshake a byte at a time included)."""
        while not self._stopping.wait(HEARTBEAT_S / 5):
            now = time.monotonic()
            with self._lock:
                beats = list(self._serving.values())
                late = [conn for conn, accepted in self._admitting.values() if now - accepted > HELLO_TIMEOUT_S]
            for beat in beats:
                beat.beat(now)
            for conn in late:
                _shut(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # listener closed
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _keepalive(conn)
            except OSError:  # reset before we got to it
                conn.close()
                continue
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._conns.add(conn)
                if not self._needs_hello and not self._hello_wanted():
                    if not self._start_serving(conn, peer[0]):
                        self._conns.discard(conn)
                        conn.close()
                    continue
            t = threading.Thread(target=self._admit, args=(conn, peer[0]), name="dataplane-hello", daemon=True)
            with self._lock:
                oldest = None
                if len(self._admitting) >= MAX_UNADMITTED:
                    oldest, _ = self._admitting.pop(next(iter(self._admitting)))
                    if not self._full:
                        logger.warning("data plane: %d connections are waiting for their hello; dropping the oldest "
                                       "for each new one", MAX_UNADMITTED)
                self._full = oldest is not None
                self._admitting[t] = [conn, time.monotonic()]
                self._hello_threads.add(t)
            if oldest is not None:
                _shut(oldest)
            t.start()

    def _admit(self, conn: socket.socket, peer: str) -> None:
        """TLS and hello of one connection; serve it when they pass."""
        me = threading.current_thread()
        admitted = False
        try:
            conn = self._wrap(conn)
            admitted = self._admitted(conn, peer)
        except Exception as e:  # noqa: BLE001 gone, timed out, dropped, or shut mid-handshake (TLS: ValueError)
            logger.debug("data plane connection from %s ended before its hello: %s", peer, e)
        with self._lock:
            dropped = self._admitting.pop(me, None) is None
            self._hello_threads.discard(me)
            if admitted and not dropped and not self._stopping.is_set() and self._start_serving(conn, peer):
                return
            self._conns.discard(conn)
        conn.close()

    def _start_serving(self, conn: socket.socket, peer: str) -> bool:
        """Serve an admitted connection on an MLX worker of its own; False when
        there is none. Call with the lock held, so that stop() either sees its
        loop or refuses it first. Past ``MAX_SERVED`` the least recently active
        connection is shut, and its worker serves this one."""
        crowded = len(self._active) >= MAX_SERVED
        if crowded:
            idle = min(self._active, key=self._active.get)
            self._active.pop(idle)
            _shut(idle)  # its loop ends, forgets it, and hands its worker back
            if not self._crowded:
                logger.warning("data plane: %d connections are open; dropping the least recently active for %s",
                               MAX_SERVED, peer)
        self._crowded = crowded
        if not self._idle_workers and self._workers >= MAX_SERVED:
            self._lock.wait_for(lambda: self._idle_workers or self._stopping.is_set(), _WORKER_WAIT_S)
        if self._stopping.is_set() or (not self._idle_workers and self._workers >= MAX_SERVED):
            logger.warning("data plane: no worker for %s: %d connections are busy", peer, MAX_SERVED)
            return False
        if self._idle_workers:
            worker = self._idle_workers.pop()
        else:
            worker, self._workers = MLXWorker("dataplane"), self._workers + 1
        self._active[conn] = time.monotonic()
        self._serving[conn] = beat = _Beat(conn)
        beat.loop = worker.submit(self._serve, beat, peer, worker)  # under the lock: before its loop can end
        return True

    def _wrap(self, conn: socket.socket) -> socket.socket:
        """With TLS, the TLS socket over ``conn`` (the handshake waits for ``_admitted``)."""
        conn.settimeout(HELLO_TIMEOUT_S)
        if self._tls is None:
            return conn
        with self._lock:
            if self._stopping.is_set():
                raise OSError("the data plane is stopping")
            self._conns.discard(conn)
            conn = self._tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            self._conns.add(conn)
            entry = self._admitting.get(threading.current_thread())
            if entry is not None:  # the ticker shuts the TLS socket from now on
                entry[0] = conn
        return conn

    def _admitted(self, conn: socket.socket, peer: str) -> bool:
        """Run the TLS handshake and check the hello, once per connection.

        Raises:
            OSError: the handshake failed or the peer went away.
        """
        if self._tls is not None:
            conn.do_handshake()
        router = self._hello_wanted()
        if self._security.token or router:
            try:
                hello = wire.recv_frame(conn, pb.DataPlaneHello, _HELLO_BYTES)
            except ExpertmeshError:
                hello = None
            why, error = self._security.token_error(hello.token if hello else None), AuthError()
            if router and not why:
                why, error = self._hello_error(hello or pb.DataPlaneHello()), OwnershipError()
            if why:
                logger.warning("data plane: refused %s: %s", peer, why)
                self._refuse(conn, pb.ForwardResponse(error_code=status_code(error).value[0], error=why))
                return False
            wire.send_frame(conn, pb.ForwardResponse())
        conn.settimeout(None)
        return True

    def drop_all(self) -> None:
        """Shut every admitted connection (another router holds the node now)."""
        with self._lock:
            admitted = list(self._serving)
        for conn in admitted:
            _shut(conn)

    @staticmethod
    def _refuse(conn: socket.socket, reply: pb.ForwardResponse) -> None:
        """Send ``reply`` and close so that the peer reads it: unread frames of
        its own left in our buffer would otherwise reset the connection first."""
        wire.send_frame(conn, reply)
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(_DRAIN_S)
        deadline = time.monotonic() + _DRAIN_S
        while conn.recv(1 << 16) and time.monotonic() < deadline:
            pass

    def _serve(self, beat: _Beat, peer: str, worker: MLXWorker) -> None:
        conn = beat.conn
        try:
            while True:
                try:
                    req, size = wire.recv_frame_sized(conn, pb.ForwardRequest, self._max_bytes)
                except ExpertmeshError as e:  # oversized or unparsable: the stream is lost
                    self._refuse(conn, pb.ForwardResponse(error_code=status_code(e).value[0], error=str(e)))
                    return
                if req is None:
                    return
                beat.current = (req.request_id, now := time.monotonic())
                self._active[conn] = now
                self._count(size, beat.send(self._answer(req)))
                self._after()
        except OSError as e:  # peer went away, stop() shut the socket, or TLS failed
            logger.debug("data plane connection from %s ended: %s", peer, e)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._active.pop(conn, None)
                self._serving.pop(conn, None)
                if keep := not self._stopping.is_set():  # the next connection runs on this thread
                    self._idle_workers.append(worker)
                    self._lock.notify_all()
            conn.close()
            if not keep:
                worker.release()

    def _answer(self, req: pb.ForwardRequest) -> pb.ForwardResponse:
        """The reply to one request; a failed one is answered and the connection goes on."""
        try:
            return self._handle(req)
        except ExpertmeshError as e:
            code, error = status_code(e), str(e)
        except Exception as e:  # a bug must not cost the router its connection
            logger.exception("data plane: request %d failed", req.request_id)
            code, error = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"
        return pb.ForwardResponse(request_id=req.request_id, error_code=code.value[0],
                                  error=f"request {req.request_id}: {error}")

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            self._lock.notify_all()
            conns = list(self._conns)
        for listener in self._listeners:
            _shut(listener)  # wakes accept(); close() alone does not
            listener.close()
        for conn in conns:
            _shut(conn)
        for t in self._acceptors:
            t.join(timeout=10)
        self.join_admissions(timeout=10)
        with self._lock:
            serving = [beat.loop for beat in self._serving.values()]
        for fut in serving:
            fut.result(timeout=10)
        with self._lock:
            idle, self._idle_workers = self._idle_workers, []
        for worker in idle:
            worker.release()


def _keepalive(conn: socket.socket) -> None:
    """Probe an idle connection, so that one whose peer vanished (host
    unplugged) ends within about a minute instead of holding its slot."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))  # Linux / macOS
    for option, value in ((idle, 30), (getattr(socket, "TCP_KEEPINTVL", None), 10),
                          (getattr(socket, "TCP_KEEPCNT", None), 3)):
        if option is not None:
            conn.setsockopt(socket.IPPROTO_TCP, option, value)


def _shut(conn: socket.socket) -> None:
    """Wake whatever waits on ``conn`` (its own thread then closes it)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except Exception:  # noqa: BLE001 already closed or reset; a TLS socket mid-handshake
        pass
