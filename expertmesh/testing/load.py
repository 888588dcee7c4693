"""A mesh of node processes and a router on loopback under rounds of concurrent
Generate streams: the helpers of tests/test_load.py and benchmarks/load.py."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmesh import Client
from expertmesh.testing.process import Process


def prompts(n: int) -> list[str]:
    """``n`` prompts of different lengths."""
    words = "the router looks at each token and picks two experts on the nodes".split()
    return [f"Request {i}: " + " ".join(words[: 1 + i % len(words)]) for i in range(n)]


@dataclass
class Round:
    tokens: list[list[int]]
    ttft: list[float] = field(default_factory=list)  # seconds from the call to its first token
    itl: list[float] = field(default_factory=list)   # seconds between consecutive tokens of a stream
    seconds: float = 0.0


def run_round(address: str, texts: list[str], max_tokens: int, timeout: float = 300) -> Round:
    """All ``texts`` as concurrent streams, started together."""
    result = Round([[] for _ in texts])
    start, lock, errors = threading.Barrier(len(texts)), threading.Lock(), []

    def one(i: int) -> None:
        try:
            with Client(address, timeout=timeout) as c:
                start.wait(timeout)
                times = [time.perf_counter()]
                for piece in c.generate(texts[i], max_tokens=max_tokens):
                    times.append(time.perf_counter())
                    result.tokens[i].append(piece.token)
            with lock:
                result.ttft.append(times[1] - times[0])
                result.itl.extend(np.diff(times[1:]).tolist())
        except Exception as e:  # reported by the caller
            errors.append(e)

    tic = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"{len(errors)} of {len(texts)} streams failed: {errors[:1]}")
    result.seconds = time.perf_counter() - tic
    return result


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024


@contextmanager
def mesh(model: Path, nodes: int, logs: Path):
    """Node processes and a router process on loopback: (router address, processes)."""
    procs = [Process(["node", "--model", str(model), "--name", f"load{i}", "--memory-gb", "1", "--no-discovery"],
                     logs / f"node{i}.log") for i in range(nodes)]
    try:
        peers = [p.address(timeout=120) for p in procs]
        procs.append(Process(["router", "--model", str(model), "--port", "0", "--no-discovery",
                              *[a for peer in peers for a in ("--peer", peer)]], logs / "router.log"))
        yield procs[-1].address(timeout=120), procs
    finally:
        for p in reversed(procs):
            p.stop()


def percentiles(xs: list[float]) -> str:
    p50, p99 = np.percentile(np.array(xs) * 1e3, [50, 99])
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
