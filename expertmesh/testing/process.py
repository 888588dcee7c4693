"""A child ``expertmesh`` process whose output can be waited on line by line."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from expertmesh.errors import ExpertmeshError

_LISTENING = r"^expertmesh (?:node|router)\b.* listening on (\S+)"
SERVERS = ("node", "router")


def cli_args(args: Sequence[str]) -> list[str]:
    """``expertmesh`` arguments with ``--no-discovery`` right after ``node`` or ``router``:
    no mDNS on the machine's network unless a later ``--discovery`` asks (in a namespace)."""
    return [args[0], "--no-discovery", *args[1:]] if args and args[0] in SERVERS else list(args)


class Process:
    """A child expertmesh process; its output (stdout and logs) goes to ``log``
    and can be waited on line by line. Its arguments pass through :func:`cli_args`.

    Args:
        args: the ``expertmesh`` command line.
        log: where its output goes.
        prefix: what to run it under, e.g. ``["ip", "netns", "exec", NS]``.
        env: variables to set for it (e.g. ``HF_HOME``).
    """

    def __init__(self, args: list[str], log: Path, prefix: Sequence[str] = (), env: dict | None = None):
        self.log = log
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "expertmesh.cli", *cli_args(args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._lines: queue.SimpleQueue = queue.SimpleQueue()
        self._address: str | None = None
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        with open(self.log, "w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The next output line matching ``pattern``.

        Raises:
            ExpertmeshError: none within ``timeout`` seconds, or the process ended.
        """
        deadline = time.monotonic() + timeout
        try:
            while (line := self._lines.get(timeout=max(0.0, deadline - time.monotonic()))) is not None:
                if m := re.search(pattern, line):
                    return m
        except queue.Empty:
            raise ExpertmeshError(f"no line like {pattern!r} after {timeout:g}s; see {self.log}") from None
        self._lines.put(None)  # later calls see the end too
        raise ExpertmeshError(f"process exited: {self.tail(1) or '(no output)'}")

    def address(self, timeout: float) -> str:
        """The HOST:PORT from its ``listening on`` line (the same on later calls)."""
        if self._address is None:
            self._address = self.wait_for(_LISTENING, timeout).group(1)
        return self._address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pumping.join(timeout=10)  # its last lines are in the log

    def tail(self, lines: int = 30) -> str:
        """The last lines of its output (all of it once :meth:`stop` returned)."""
        return "\n".join(self.log.read_text().strip().splitlines()[-lines:])
