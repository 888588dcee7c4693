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
from pathlib import Path

from expertmesh.testing.load import mesh, percentiles, prompts, rss_mb, run_round
from expertmesh.testing.tinymodel import write_tiny_model


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
