"""Where an expert-mode decode token's time goes: a router in this process
(its dispatcher timed from outside) over node processes, the same 24-layer
checkpoint as ``make bench``. Run it twice, with and without
``EXPERTMESH_COMPILE=0``, to see what compiling decode steps gives.

    python benchmarks/breakdown.py [--nodes 2] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import mlx.core as mx

from expertmesh.demo import Process
from expertmesh.options import GenerationOptions
from expertmesh.router import Router, RouterConfig
from expertmesh.router import dispatcher
from expertmesh.v1 import expertmesh_pb2 as pb
from run import PROMPT, bench_model

spent: dict[str, float] = defaultdict(float)
calls: dict[str, int] = defaultdict(int)


def timed(name: str, fn):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            spent[name] += time.perf_counter() - t
            calls[name] += 1
    return wrapper


class _TimedMx:
    """The dispatcher's ``mx`` with its one ``eval`` per layer timed."""

    eval = staticmethod(timed("router eval (attention, norms, gate)", mx.eval))

    def __getattr__(self, name):
        return getattr(mx, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dispatcher.mx = _TimedMx()
    dispatcher.NodeLink.submit = timed("send (sendall per node)", dispatcher.NodeLink.submit)
    dispatcher.NodeLink.receive = timed("wait for the node + read", dispatcher.NodeLink.receive)
    dispatcher.Dispatcher.__call__ = timed("dispatcher, in all", dispatcher.Dispatcher.__call__)
    os.environ["EXPERTMESH_DISCOVERY"] = "off"
    root = Path(tempfile.mkdtemp(prefix="expertmesh-breakdown-"))
    nodes, router = [], None
    try:
        model = bench_model(root, 24, False)
        nodes = [Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", "4", "--no-discovery"],
                         root / f"node{i}.log") for i in range(args.nodes)]
        router = Router(RouterConfig(model=model, peers=[p.address(timeout=300) for p in nodes], port=0,
                                     mode="expert"))
        router.connect()

        def generate() -> float:
            *_, last = router.generate(PROMPT, options=GenerationOptions(max_tokens=args.tokens))
            return last.generation_tps

        generate()  # warm-up: compiles, caches
        before = [link.stub.GetStats(pb.GetStatsRequest(), timeout=10) for link in router.links]
        spent.clear()
        calls.clear()
        t = time.perf_counter()
        tps = [generate() for _ in range(args.rounds)]
        wall = time.perf_counter() - t
        after = [link.stub.GetStats(pb.GetStatsRequest(), timeout=10) for link in router.links]
    finally:
        if router is not None:
            router.stop(grace=0)
        for p in nodes:
            p.stop()
        shutil.rmtree(root, ignore_errors=True)
    layers = calls["dispatcher, in all"]
    tokens = layers / 24
    compute = sum(b.compute_seconds - a.compute_seconds for a, b in zip(before, after))
    requests = sum(b.forward_requests - a.forward_requests for a, b in zip(before, after))
    print(f"compile {'on' if os.environ.get('EXPERTMESH_COMPILE', '1') != '0' else 'off'}: "
          f"decode {statistics.median(tps):.1f} tok/s; {wall / tokens * 1e3:.2f} ms per token, prefill included")
    for name, s in spent.items():
        print(f"  {name:<38} {s / layers * 1e6:6.0f} us per MoE layer ({calls[name] / layers:.2f} calls)")
    print(f"  {'node compute (each request)':<38} {compute / requests * 1e6:6.0f} us ({requests / layers:.2f} requests"
          " per layer, nodes in parallel)")
    print(f"  {'router outside the dispatcher':<38} {(wall - spent['dispatcher, in all']) / layers * 1e6:6.0f} us per "
          "MoE layer (graph building, lm head, sampling, batching)")


if __name__ == "__main__":
    main()
