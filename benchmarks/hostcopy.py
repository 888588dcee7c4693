"""Host reads and writes of MLX arrays: MLX's own copies against pinned memory.

    python3 benchmarks/hostcopy.py [--out FILE] [--rounds N]

In one process, the ways alternating round by round, medians in µs:
- read: a fresh kernel output evaluated and its bytes copied out on the
  host, through MLX (``memoryview``) or ``expertmesh.hostcopy.read``;
- write: host bytes into an array one kernel consumes, evaluated, as
  ``mx.array(numpy)``, written in place (``Staging.put``) or
  ``hostcopy.write``;
- a node-like round: a host input, 20 small kernels, the output read back.

Sizes: 1, 8 and 512 rows of 2048 bfloat16 (a decode step's hidden states,
8 streams', a 512-token prompt's). Also checks that every way gives the same
bytes, on the main thread and on another. Meaningful on MLX's CUDA backend
(elsewhere ``hostcopy`` is not available and only MLX's ways run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import mlx.core as mx
import numpy as np

from expertmesh import hostcopy
from expertmesh.staging import Staging

H = 2048


def _time(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        tic = time.perf_counter()
        fn()
        out.append((time.perf_counter() - tic) * 1e6)
    return out


def ways(rows: int, pinned: bool) -> dict:
    rng = np.random.default_rng(rows)
    host16 = rng.integers(0, 1 << 16, size=(rows, H), dtype=np.uint16)
    x = mx.array(host16).view(mx.bfloat16)
    mx.eval(x)
    staging = Staging()

    def read_mlx():
        y = (x + 1).view(mx.uint32).reshape(-1)
        mx.eval(y)
        return np.frombuffer(memoryview(y), np.uint32).copy()

    def read_pinned():
        return hostcopy.read((x + 1).view(mx.uint32).reshape(-1)).copy()

    def eval_only():
        mx.eval(x + 1)

    def write_fresh():
        mx.eval(mx.array(host16).view(mx.bfloat16) + 1)

    def write_staged():
        mx.eval(staging.put("in", host16).view(mx.bfloat16) + 1)

    def write_pinned():
        mx.eval(hostcopy.write(host16, mx.bfloat16) + 1)

    def chain(a):
        for _ in range(20):
            a = a * 1.0001 + 0.0001
        return a

    def round_mlx():
        y = chain(mx.array(host16).view(mx.bfloat16)).view(mx.uint32).reshape(-1)
        mx.eval(y)
        return np.frombuffer(memoryview(y), np.uint32).copy()

    def round_pinned():
        return hostcopy.read(chain(hostcopy.write(host16, mx.bfloat16)).view(mx.uint32).reshape(-1)).copy()

    fns = {"eval_only": eval_only, "read_mlx": read_mlx, "write_fresh": write_fresh, "write_staged": write_staged,
           "round_mlx": round_mlx}
    if pinned:
        fns |= {"read_pinned": read_pinned, "write_pinned": write_pinned, "round_pinned": round_pinned}
    return fns


def check(pinned: bool) -> dict:
    """Every way's bytes against numpy's, here and on another thread."""
    if not pinned:
        return {}
    result = {}

    def run(tag):
        for rows in (1, 3, 512):
            host = np.random.default_rng(rows).integers(0, 1 << 16, size=(rows, H), dtype=np.uint16)
            x = mx.array(host).view(mx.bfloat16)
            got = hostcopy.read(x.view(mx.uint32).reshape(-1)).view(np.uint16).reshape(rows, H)
            back = hostcopy.write(host, mx.bfloat16)
            result[f"{tag}_{rows}"] = bool(np.array_equal(got, host)
                                           and np.array_equal(np.asarray(back.view(mx.uint16)), host))

    run("main")
    t = threading.Thread(target=run, args=("thread",))
    t.start()
    t.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=200)
    args = ap.parse_args()
    pinned = hostcopy.available()
    report = {"device": str(mx.default_device()), "mlx": mx.__version__, "pinned_available": pinned,
              "equal": check(pinned), "us": {}}
    for rows in (1, 8, 512):
        fns = ways(rows, pinned)
        for fn in fns.values():  # warm: kernels compiled, buffers made
            for _ in range(20):
                fn()
        samples = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                samples[name] += _time(fn, args.per_round)
        report["us"][rows] = {name: round(statistics.median(v), 1) for name, v in samples.items()}
        print(rows, report["us"][rows], flush=True)
    print(json.dumps(report["equal"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
