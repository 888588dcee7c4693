"""A ThreadingHTTPServer that one client cannot monopolise (``Limits``).

At most ``max_connections`` connections are served at once; past that a new
one is answered 503 at once, on the accepting thread, without a thread of its
own. A request's line, headers and body must arrive within ``read_s`` in all
(a watchdog thread shuts slower sockets: a slow-loris client sending a byte a
second is cut off), and every read or write within ``io_s``. Handlers call
``request_read()`` once the request is in, and ask ``peer_gone()`` to learn
that the client left.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

_DRAIN_BYTES = 64 << 10


@dataclass(frozen=True)
class Limits:
    """What one HTTP client may take (see the module docstring)."""

    max_connections: int = 64
    read_s: float = 30.0      # request line, headers and body, in all; also an idle connection's wait
    io_s: float = 30.0        # one read or write
    request_s: float = 600.0  # one generation, from its body to its last token


class Watchdog:
    """Shuts a connection's socket when its deadline passes (one thread for all)."""

    def __init__(self):
        self._deadlines: dict[int, tuple[float, socket.socket]] = {}
        self._next = 0
        self._closed = False
        self._cond = threading.Condition()
        threading.Thread(target=self._run, name="http-watchdog", daemon=True).start()

    def arm(self, sock: socket.socket, seconds: float) -> int:
        with self._cond:
            self._next += 1
            self._deadlines[self._next] = (time.monotonic() + seconds, sock)
            self._cond.notify()
            return self._next

    def disarm(self, token: int | None) -> None:
        with self._cond:
            self._deadlines.pop(token, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                for token, (deadline, sock) in list(self._deadlines.items()):
                    if deadline <= now:
                        del self._deadlines[token]
                        try:
                            sock.shutdown(socket.SHUT_RDWR)  # its handler's read or write fails at once
                        except OSError:
                            pass
                soonest = min((d for d, _ in self._deadlines.values()), default=now + 60)
                self._cond.wait(max(soonest - now, 0.01))


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, up to ``limits.max_connections``; handlers are ``BoundedHandler``s."""

    daemon_threads = True

    def __init__(self, address, handler, limits: Limits):
        self.limits = limits
        self.slots = threading.BoundedSemaphore(limits.max_connections)
        self.watchdog = Watchdog()
        self._crowded = False  # at max_connections (logged once per episode)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        """A thread for the connection, or 503 at once when ``max_connections`` are open."""
        if not self.slots.acquire(blocking=False):
            if not self._crowded:
                logger.warning("HTTP: %d connections are open; answering 503 to new ones",
                               self.limits.max_connections)
            self._crowded = True
            return self._busy(request)
        self._crowded = False
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def busy_body(self) -> dict:
        """The JSON of the 503 answer."""
        return {"error": f"{self.limits.max_connections} connections are open; retry later"}

    def _busy(self, request: socket.socket) -> None:
        if not isinstance(request, ssl.SSLSocket):  # no handshake on the accepting thread: TLS just closes
            body = json.dumps(self.busy_body()).encode()
            head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
            try:
                request.setblocking(False)
                request.recv(_DRAIN_BYTES)  # what it sent already: unread, it would reset the answer
            except OSError:
                pass
            try:
                request.send(head.encode() + body)
            except OSError:
                pass
        self.shutdown_request(request)


class BoundedHandler(BaseHTTPRequestHandler):
    """Reads each request within ``limits.read_s`` and every byte within ``limits.io_s``."""

    _reading: int | None = None  # the watchdog's token while the request is read

    def setup(self):
        self.timeout = self.server.limits.io_s  # every read and write of this connection
        super().setup()

    def handle_one_request(self):
        self._reading = self.server.watchdog.arm(self.connection, self.server.limits.read_s)
        try:
            super().handle_one_request()
        finally:
            self.request_read()

    def request_read(self) -> None:
        """The request is in: its read deadline is off."""
        self.server.watchdog.disarm(self._reading)
        self._reading = None

    def peer_gone(self) -> bool:
        """Whether the client closed its connection (never blocks)."""
        return peer_gone(self.connection)


_RDHUP = getattr(select, "POLLRDHUP", 0)  # Linux: the peer's FIN, even behind unread bytes (TLS)


def peer_gone(sock: socket.socket) -> bool:
    """Whether the peer closed (or reset) ``sock``; never blocks."""
    try:
        if _RDHUP:
            poll = select.poll()
            poll.register(sock, _RDHUP | select.POLLHUP | select.POLLERR)
            return bool(poll.poll(0))
        raw = socket.socket(fileno=sock.fileno())  # below TLS: peek, so nothing is consumed
        try:
            return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        finally:
            raw.detach()
    except (OSError, ValueError):  # closed, or shut by the watchdog
        return True
