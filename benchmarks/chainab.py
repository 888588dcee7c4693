"""An A/B of expertmesh/router/chain.py in one auto-mode mesh, the settings
alternating round by round so that each sees the same machine:

- a long prompt's time to its first token at each ``--prefill-chunk`` value
  (0: the prompt in one piece, span after span);
- decode tok/s with consecutive spans run as a chain (each reply passed on as
  the wire carried it, one eval a pass) and relayed through the router's MLX
  one span after the other, as before the chain.

    python benchmarks/chainab.py MODEL [--chunks 0 64 128 256] [--rounds 3] [--pin] [--json OUT]

A router in this process over 2 ``expertmesh node`` processes on loopback
(``--no-discovery``). Medians over the rounds; the first round only warms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def measure(model: Path, logs: Path, prompt: str, chunks=(0, 64, 128, 256), rounds: int = 3, tokens: int = 64,
            nodes: int = 2, pin: bool = False) -> dict:
    """``pin``: each node process on a CPU of its own (``sched_setaffinity``,
    which the process inherits), as nodes on machines of their own compute
    side by side; the router keeps every CPU."""
    from expertmesh.options import GenerationOptions
    from expertmesh.router import Router, RouterConfig
    from expertmesh.testing.process import Process
    from run import PROMPT

    procs, router = [], None
    try:
        cpus = sorted(os.sched_getaffinity(0))
        for i in range(nodes):
            if pin:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})
            try:
                procs.append(Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", "40",
                                      "--no-discovery"], logs / f"chainab-node{i}.log"))
            finally:
                os.sched_setaffinity(0, cpus)
        router = Router(RouterConfig(model=model, peers=[p.address(timeout=300) for p in procs], port=0,
                                     mode="auto"))
        router.connect()
        rt = router.stage_runtime
        if rt is None or not rt._chains:
            raise RuntimeError(f"the plan has no consecutive spans to chain: {router.plan.describe(0)}")
        chained = rt._chains

        def first_token_ms(chunk: int) -> float:
            rt.prefill_chunk = chunk
            t = time.perf_counter()
            next(iter(router.generate(prompt, options=GenerationOptions(max_tokens=1))))
            return (time.perf_counter() - t) * 1e3

        def decode_tps(chain: bool) -> float:
            rt._chains = chained if chain else {}
            try:
                *_, last = router.generate(PROMPT, options=GenerationOptions(max_tokens=tokens))
            finally:
                rt._chains = chained
            return last.generation_tps

        prefill: dict[int, list[float]] = {c: [] for c in chunks}
        decode: dict[str, list[float]] = {"chained": [], "relayed": []}
        for r in range(rounds + 1):  # the first warms every shape
            for c in chunks:
                prefill[c].append(first_token_ms(c))
            for key in decode:
                decode[key].append(decode_tps(key == "chained"))
        spans = sorted(s for v in router.plan.stages.values() for s in v)
    finally:
        if router is not None:
            router.stop(grace=0)
        for p in procs:
            p.stop()
    return {"spans": [list(s) for s in spans], "rounds": rounds, **({"pinned": True} if pin else {}),
            "prefill_first_token_ms": {str(c): statistics.median(v[1:]) for c, v in prefill.items()},
            "decode_tps": {k: statistics.median(v[1:]) for k, v in decode.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--pin", action="store_true", help="each node on a CPU of its own")
    args = p.parse_args()
    import run

    with tempfile.TemporaryDirectory(prefix="expertmesh-chainab-") as logs:
        r = measure(args.model, Path(logs), run.long_prompt(args.model, args.prompt_tokens), args.chunks,
                    args.rounds, pin=args.pin)
    r["command"] = " ".join(["benchmarks/chainab.py", *sys.argv[1:]])
    print(json.dumps(r, indent=1))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
