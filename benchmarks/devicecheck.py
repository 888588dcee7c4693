"""The mesh's tokens against mlx-lm's on the device's own backend: the trained
built-in model (near-ties between logits, so a wrong token shows), 2 node
processes as ``expertmesh node`` runs them (stage steps set running ahead on
CUDA, ``nodes/prelaunch.py``), a router in this process, every mode; one
stream, then 3 at once.

    python3 benchmarks/devicecheck.py [--out FILE]

Exits 1 when a token is not mlx-lm's greedy choice to within 1e-3.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mlx_lm import load

from expertmesh import Client, hostcopy
from expertmesh.builtin import model_dir
from expertmesh.router import Router, RouterConfig
from expertmesh.testing.greedy import not_greedy
from expertmesh.testing.process import Process

from breakdown import node_prelaunch_counts

PROMPTS = ["class Point:\n    def __repr__(self):\n        return ", "    def __len__(self):\n        return ",
           "def __init__(self, ", "class Error(Exception):\n    \"\"\"", "if __name__ == '__main__':\n"]
TOKENS, TOL = 48, 1e-3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    model = model_dir()
    reference = load(str(model))
    logs = Path(tempfile.mkdtemp(prefix="devicecheck-"))
    procs = [Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", "1", "--no-discovery"],
                     logs / f"n{i}.log") for i in range(2)]
    report = {"modes": {}}
    try:
        peers = [p.address(timeout=120) for p in procs]
        for mode in ("pipeline", "expert", "auto"):
            router = Router(RouterConfig(model=model, peers=peers, port=0, mode=mode))
            try:
                router.connect()
                router.start()
                with Client(f"127.0.0.1:{router.port}") as client:
                    def stream(prompt):
                        return [x.token for x in client.generate(prompt, max_tokens=TOKENS)]

                    got = {PROMPTS[0]: stream(PROMPTS[0])}
                    with ThreadPoolExecutor(3) as pool:
                        got.update(zip(PROMPTS[1:4], pool.map(stream, PROMPTS[1:4])))
            finally:
                router.stop()
            bad = {p: not_greedy(reference, p, t, TOL) for p, t in got.items()}
            report["modes"][mode] = {"tokens": sum(map(len, got.values())),
                                     "not_greedy": {p[:20]: b for p, b in bad.items() if b}}
            print(mode, report["modes"][mode], flush=True)
        # each node's steps set running ahead (CUDA): answered, given up, let go
        report["prelaunch"] = {address: node_prelaunch_counts(address) for address in peers}
        print("steps set running ahead:", report["prelaunch"], flush=True)
    finally:
        for p in procs:
            p.proc.kill()
            p.proc.wait(timeout=30)
    report["ok"] = all(not m["not_greedy"] and m["tokens"] == 4 * TOKENS for m in report["modes"].values())
    if hostcopy.on_cuda():  # the nodes' gates answered (a node in pipeline and auto mode holds one span)
        report["ok"] &= all(counts["answered"] > 0 for counts in report["prelaunch"].values())
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print("ok" if report["ok"] else "NOT OK", flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
