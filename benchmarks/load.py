"""Load: many concurrent Generate streams against one router with node processes.

Rounds of ``--streams`` concurrent greedy streams on a tiny qwen3_moe, mesh
of ``--nodes`` node processes + a router process on loopback; prints p50/p99
time to first token and inter-token latency, and every process's RSS after
each round (a leak grows it round after round).

    .venv/bin/python benchmarks/load.py [--streams 32] [--rounds 3] [--tokens 8] [--nodes 2]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from expertmesh import Client
from expertmesh.demo import Process
from expertmesh.tinymodel import write_tiny_model


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_model(Path(tmp) / "tiny", seed=1)
        with mesh(model, args.nodes, Path(tmp)) as (address, procs):
            texts = prompts(args.streams)
            for n in range(args.rounds):
                r = run_round(address, texts, args.tokens)
                print(f"round {n + 1}: {args.streams} streams x {args.tokens} tokens in {r.seconds:.2f}s; "
                      f"TTFT {percentiles(r.ttft)}; inter-token {percentiles(r.itl)}; RSS MB "
                      + ", ".join(f"{p.proc.pid}: {rss_mb(p.proc.pid):.0f}" for p in procs), flush=True)


if __name__ == "__main__":
    main()
