"""MLXWorker: one long-lived thread that does all of a component's MLX work.

mlx keeps per-thread state whose destructor needs the GIL. A thread that
used mlx and ends while the interpreter is finalizing (a gRPC pool thread,
say) aborts the whole process. So servers never touch mlx from their
handler threads: they hand the work to their worker, which is stopped
explicitly (``close``) before the process exits.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class MLXWorker:
    def __init__(self, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # handed to the caller
                    fut.set_exception(e)

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def run(self, fn: Callable, *args) -> Any:
        """Run ``fn(*args)`` on the worker and wait for its result."""
        return self.submit(fn, *args).result()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
