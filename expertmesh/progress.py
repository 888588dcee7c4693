"""Progress of long work (loading experts; later calibration, rebalancing):
one bar per task on stderr when it is a terminal or bars are asked for,
one log line when a task starts and one when it ends otherwise, so logs and
tests stay clean."""

from __future__ import annotations

import logging
import sys
import threading
from typing import TextIO

logger = logging.getLogger(__name__)


class Progress:
    """Tracks named tasks (e.g. one per node); ``update`` may come from any thread.

    Args:
        what: the verb shown before each task, e.g. "loading".
        bars: draw bars (tqdm); None: only when ``stream`` is a terminal.
        unit: what ``done``/``total`` count; "B" shows bytes scaled (kB, MB, ...).
        stream: where bars go (default stderr).
    """

    def __init__(self, what: str, bars: bool | None = None, unit: str = "B", stream: TextIO | None = None):
        self.what, self.unit = what, unit
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self._tasks: dict[str, object] = {}  # task -> its tqdm bar, or True once logged
        self._finished: set[str] = set()
        self._lock = threading.Lock()

    def update(self, task: str, done: int, total: int) -> None:
        """``task`` has done ``done`` of ``total`` (done >= total: finished)."""
        with self._lock:
            if task in self._finished:
                return
            finished = done >= total
            if self.bars:
                self._draw(task, done, total)
            elif task not in self._tasks:
                self._tasks[task] = True
                logger.info("%s %s: %s", self.what, task, self._amount(total))
            if finished:
                self._finished.add(task)
                if self.bars:
                    self._tasks[task].close()
                else:
                    logger.info("%s %s: done (%s)", self.what, task, self._amount(done))

    def _draw(self, task: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self._tasks.get(task)
        if bar is None:
            bar = self._tasks[task] = tqdm(total=total, desc=f"{self.what} {task}", unit=self.unit,
                                           unit_scale=self.unit == "B", position=len(self._tasks),
                                           file=self.stream, leave=True, dynamic_ncols=True)
        bar.total = total
        bar.update(done - bar.n)

    def _amount(self, n: int) -> str:
        return f"{n / 1e6:.1f} MB" if self.unit == "B" else f"{n} {self.unit}"

    def close(self) -> None:
        """End the bars of unfinished tasks (e.g. after a failure)."""
        with self._lock:
            if self.bars:
                for task, bar in self._tasks.items():
                    if task not in self._finished:
                        bar.close()
            self._finished.update(self._tasks)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
