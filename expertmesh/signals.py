"""A server's main thread waiting for Ctrl-C or SIGTERM, without an exception
raised into lock code.

The CLI's handlers raise ``KeyboardInterrupt``, so that a signal ends whatever
a command is doing. Raised while the main thread is inside ``threading``'s
lock code (a ``Condition.wait``, as grpc's ``wait_for_termination`` runs), the
exception can land between a lock's release and its re-acquire: the ``with``
then fails with ``RuntimeError: release unlocked lock`` and the command ends
with a traceback and status 1 instead of stopping cleanly (seen in CI). While a
server waits here, the handlers only note the signal, through
``signal.set_wakeup_fd`` as asyncio does, and :meth:`StopSignals.wait` returns
it; nothing is raised asynchronously. A client command reads its reply
through :func:`interruptible`: the stream is read on another thread, and the
signal cancels it and raises ``KeyboardInterrupt`` at a plain point of the
main thread's code.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import socket
import threading
import time
from typing import Iterator, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _restore(handlers: list) -> None:
    """Put back ``(signal, handler)`` pairs, each one even when a restored
    handler raises (a pending Ctrl-C) before the next is back."""
    if handlers:
        try:
            signal.signal(*handlers[0])
        finally:
            _restore(handlers[1:])


class StopSignals:
    """``with StopSignals() as stop: stop.wait()``: in the main thread, SIGINT
    and SIGTERM are noted rather than raised until the block ends (then the
    handlers before it are back). Each signal is reported once, in order.
    A signal that came before the block raises as before it, from ``with``."""

    def __init__(self):
        self._pending = 0  # signals read off the wakeup socket, not yet reported
        self._at_once = False

    def __enter__(self) -> "StopSignals":
        self._read, self._write = socket.socketpair()
        for s in (self._read, self._write):
            s.setblocking(False)
        self._old_fd, self._old = None, []
        try:
            self._old_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
            for s in STOP_SIGNALS:
                self._old.append((s, signal.signal(s, self._noted)))
        except BaseException:  # e.g. the old handler's KeyboardInterrupt, for a signal just before
            self.__exit__()
            raise
        return self

    def _noted(self, signum, frame) -> None:
        """The Python-level handler: the wakeup socket already has the signal."""
        if self._at_once:
            os.write(2, b"expertmesh: stopped at once, before the shutdown finished\n")
            os._exit(130)

    def wait(self, timeout: float | None = None) -> bool:
        """Whether SIGINT or SIGTERM came (one not reported yet), waiting up to
        ``timeout`` seconds for one (``None``: until one comes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._read], [], [], left)
            if not ready:
                return False
            try:
                got = self._read.recv(64)
            except BlockingIOError:
                continue
            self._pending += sum(b in STOP_SIGNALS for b in got)  # other signals' bytes: keep waiting
        self._pending -= 1
        return True

    def end_at_once_on_the_next(self) -> None:
        """From now on a signal ends the process at once with status 130: a
        shutdown that hangs can be cut short. Those come already (a double
        Ctrl-C) asked for the stop that is starting, and are dropped."""
        self._at_once = True
        while self.wait(0):
            pass

    def __exit__(self, *exc) -> None:
        """The wakeup fd first (a signal now is dropped: the block is ending),
        then the handlers, every one even if a pending signal raises."""
        try:
            if self._old_fd is not None:
                signal.set_wakeup_fd(self._old_fd)
            self._read.close()
            self._write.close()
        finally:
            _restore(self._old)


_POLL_S = 0.05  # how soon a signal is seen while no item comes


def interruptible(stream: Iterator[T]) -> Iterator[T]:
    """The items of ``stream`` (a reply being streamed, with ``cancel()``,
    e.g. ``Client.generate``'s), read on a helper thread. In the main thread,
    Ctrl-C or SIGTERM cancels the stream and raises ``KeyboardInterrupt`` here
    (within ~50 ms), never inside grpc's lock code; the stream's own errors
    are raised here as they came. Left early, the stream is cancelled too.
    Iterate it (and let it end) in the main thread: it swaps signal handlers."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    done = object()

    def pull() -> None:
        try:
            for item in stream:
                items.put(item)
            items.put(done)
        except BaseException as e:  # raised in the reader's thread
            items.put(e)

    with StopSignals() as stop:
        threading.Thread(target=pull, daemon=True, name="stream-reader").start()
        try:
            while True:
                if stop.wait(0):
                    raise KeyboardInterrupt
                try:
                    item = items.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # a signal, or the caller stopped reading: the router stops generating
            stream.cancel()
