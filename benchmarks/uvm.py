"""What moving a small array between the host and MLX's CUDA backend costs,
and whether telling the CUDA driver where its pages should live changes it.

MLX's CUDA backend gives an array made from host values managed memory
(``cudaMallocManaged``); a kernel's output lives in device memory, and a
host read of it first copies it into fresh managed memory
(``move_to_unified_memory``). On the H200 a 4 KB array in and out costs
~100 µs each way (``results/hotpath-20261201-a.json``), against ~30 µs for
a sync. Each figure: µs, median of alternating rounds.

    python benchmarks/uvm.py [--json out.json]          # on the device; figures with and without CUDA graphs

The driver is reached through ``libcuda.so.1`` (``cuMemAdvise_v2``); MLX's
own runtime is statically linked.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlxcosts import rounds  # noqa: E402

from expertmesh.staging import _writable  # noqa: E402  the node's own way to write into an array

H = 2048
ROUNDS, N = 5, 60

# CUmem_advise and CUmemLocationType (cuda.h)
SET_PREFERRED_LOCATION, SET_ACCESSED_BY = 3, 5
LOC_DEVICE, LOC_HOST = 1, 2


class Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def driver():
    """libcuda with a current context on this thread (the primary one MLX uses), or None."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    ctx = ctypes.c_void_p()
    lib.cuCtxGetCurrent(ctypes.byref(ctx))
    if not ctx.value:
        dev = ctypes.c_int()
        lib.cuDeviceGet(ctypes.byref(dev), 0)
        lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
        lib.cuCtxSetCurrent(ctx)
    lib.cuMemAdvise_v2.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, Loc]
    return lib


def address(a: mx.array) -> int:
    return np.frombuffer(memoryview(a), np.uint8).ctypes.data


def persistent(nbytes: int) -> tuple[mx.array, np.ndarray]:
    a = mx.array(np.zeros(nbytes // 2, np.uint16))
    mx.eval(a)
    return a, _writable(a, np.uint16, (nbytes // 2,))


def alternating(fns: dict) -> dict:
    """µs per call of each of ``fns``, timed in alternating rounds (``mlxcosts.rounds``)."""
    return {k: round(v, 1) for k, v in rounds(fns, n=N, repeat=ROUNDS).items()}


def measure() -> dict:
    r: dict = {"device": str(mx.default_device()), "graphs": os.environ.get("MLX_USE_CUDA_GRAPHS", "1")}
    lib = driver()
    r["driver"] = lib is not None
    rng = np.random.default_rng(0)
    host = rng.integers(0, 1 << 14, H, dtype=np.uint16)
    x = mx.array(host).view(mx.bfloat16)
    mx.eval(x)

    def use(a):  # one small kernel reading the input
        mx.eval(a.view(mx.bfloat16) * 2)

    ways = {"sync_trivial": lambda: mx.eval(x + 1), "h2d_fresh": lambda: use(mx.array(host))}
    staged = {}
    for name, advice in (("staged", []),
                         ("staged_host_pref_accessed", [(SET_PREFERRED_LOCATION, Loc(LOC_HOST, 0)),
                                                        (SET_ACCESSED_BY, Loc(LOC_DEVICE, 0))]),
                         ("staged_accessed", [(SET_ACCESSED_BY, Loc(LOC_DEVICE, 0))]),
                         ("staged_dev_pref_accessed_host", [(SET_PREFERRED_LOCATION, Loc(LOC_DEVICE, 0)),
                                                            (SET_ACCESSED_BY, Loc(LOC_HOST, 0))])):
        if advice and lib is None:
            continue
        a, view = persistent(16384)  # a page of MLX's allocator, so no neighbour shares it
        for adv, loc in advice:
            r[f"rc_{name}_{adv}"] = lib.cuMemAdvise_v2(address(a), 16384, adv, loc)
        staged[name] = (a, view)

        def write_and_use(a=a, view=view):
            np.copyto(view[:H], host)
            use(a[:H])
        ways[f"h2d_{name}"] = write_and_use
    r.update(alternating(ways))

    # device -> host: a kernel's output read on the host (a fresh managed copy each time)
    def d2h():
        y = x * 2
        mx.eval(y)
        return np.frombuffer(memoryview(y.view(mx.uint16)), np.uint16).sum()

    def eval_only():
        mx.eval(x * 2)

    # the same output written into a managed, host-preferred array by a second kernel? MLX has no
    # out= argument; what can be had is the read of an output whose buffer the allocator took from
    # its cache of managed buffers: prime the cache with host-made arrays of the output's size.
    r.update(alternating({"d2h_eval_only": eval_only, "d2h_eval_and_read": d2h}))
    primes = [mx.array(np.zeros(H, np.uint16)) for _ in range(8)]
    mx.eval(primes)
    if lib is not None:
        for p in primes:
            lib.cuMemAdvise_v2(address(p), 16384, SET_PREFERRED_LOCATION, Loc(LOC_HOST, 0))
            lib.cuMemAdvise_v2(address(p), 16384, SET_ACCESSED_BY, Loc(LOC_DEVICE, 0))
    del primes
    r.update({f"{k}_primed": v for k, v in alternating({"d2h_eval_and_read": d2h}).items()})

    # a node's round in small: host input in, 20 small kernels, output out
    def chain(a):
        for _ in range(20):
            a = a * 1.001 + 0.001
        return a
    step = mx.compile(chain)

    def node_round(inp):
        y = step(inp.view(mx.bfloat16))
        mx.eval(y)
        return np.frombuffer(memoryview(y.view(mx.uint16)), np.uint16).sum()
    rounds = {"round_fresh": lambda: node_round(mx.array(host))}
    for name, (a, view) in staged.items():
        def staged_round(a=a, view=view):
            np.copyto(view[:H], host)
            return node_round(a[:H])
        rounds[f"round_{name}"] = staged_round
    r.update(alternating(rounds))
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    parser.add_argument("--one", action="store_true", help="measure in this process only")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    out = {}
    for graphs in ("1", "0"):
        env = dict(os.environ, MLX_USE_CUDA_GRAPHS=graphs)
        p = subprocess.run([sys.executable, __file__, "--one"], env=env, capture_output=True, text=True, timeout=300)
        sys.stderr.write(p.stderr[-2000:])
        out[f"graphs_{graphs}"] = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else p.returncode
        print(graphs, out[f"graphs_{graphs}"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
