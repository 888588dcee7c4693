"""MLXWorker: a thread that does a component's MLX work.

mlx keeps per-thread state whose destructor needs the GIL. A thread that
used mlx and ends while the interpreter is finalizing aborts the whole
process ("terminate called without an active exception"), and a thread's
C++ thread-locals are destroyed *after* ``join()`` returns, so joining does
not help. Hence threads that touch mlx never end: a worker borrows a parked
thread (or starts one) and ``close()`` parks it again for the next worker.
Servers never touch mlx from gRPC handler threads; they hand work to their
worker.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

_parked: "queue.SimpleQueue[_Thread]" = queue.SimpleQueue()


class _Thread:
    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="mlx-worker", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:  # released by its worker: wait for the next one
                _parked.put(self)
                continue
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)


class MLXWorker:
    def __init__(self, name: str = "mlx-worker"):
        try:
            self._thread = _parked.get_nowait()
        except queue.Empty:
            self._thread = _Thread()
        self._thread.thread.name = name
        self._released = False

    def submit(self, fn: Callable, *args) -> Future:
        if self._released:
            raise RuntimeError("this MLXWorker is closed")
        fut: Future = Future()
        self._thread.jobs.put((fut, fn, args))
        return fut

    def run(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the worker and wait for its result."""
        return self.submit(fn, *args).result()

    def release(self) -> None:
        """Park the thread once the submitted jobs are done (does not wait)."""
        if not self._released:
            self._released = True
            self._thread.jobs.put(None)

    def close(self) -> None:
        """Wait for the submitted jobs, then park the thread."""
        if not self._released:
            self.run(lambda: None)
            self.release()
