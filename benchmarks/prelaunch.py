"""What a node's span decode step costs once its kernels are launched before
its input arrives, against the node's way now, in one process.

    python3 benchmarks/prelaunch.py MODEL [--layers 6] [--out FILE]

A node evaluates each decode step when its request comes: MLX's CUDA backend
then encodes and launches every kernel of the span while the router waits.
Here the step is built and set running (``mx.async_eval``) right after the
previous reply, its first kernel waiting on the GPU for a word in pinned host
memory (``expertmesh.hostcopy``'s kind); the request writes its input and
that word, and only the GPU's own time is left to wait for (the node's own
``nodes.prelaunch.Gate``). Medians in µs, the ways alternating step by
step, a 1 ms pause before each (the network):

- ``now``: the node's path (step built ahead on a staged placeholder; input
  written in place; evaluated, read back through pinned memory);
- ``cold``: the step built and evaluated when the input comes;
- ``prelaunched``: the step already running, waiting on its trigger.

Checks that the ways give the same bytes. CUDA only (``EXPERTMESH_PINNED=emulate``:
the first two, anywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("MLX_USE_CUDA_GRAPHS", "0")  # as nodes run (expertmesh.backend), before MLX starts

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()

    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    from expertmesh import hostcopy, wire
    from expertmesh.nodes.prelaunch import Gate
    from expertmesh.staging import Staging
    from expertmesh.v1 import expertmesh_pb2 as pb

    assert hostcopy.available(), "CUDA only (EXPERTMESH_PINNED=emulate runs the other two ways anywhere)"
    cuda = hostcopy.on_cuda()
    model, _ = load(args.model)
    layers = model.model.layers[:args.layers]
    H = model.args.hidden_size
    gate = Gate()  # the node's own (nodes/prelaunch.py)
    n_words = H // 2

    def fresh_caches():
        caches = make_prompt_cache(model)[:args.layers]
        mx.random.seed(0)
        x = mx.random.normal((1, 32, H)).astype(mx.bfloat16)
        for layer, c in zip(layers, caches):
            x = layer(x, "causal", c)
        mx.eval(x, [c.state for c in caches])
        return caches

    caches_now, caches_pre, caches_cold = fresh_caches(), fresh_caches(), fresh_caches()
    staging = Staging()
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((1, 1, H)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
              for _ in range(16)]

    def run(x, caches):
        for layer, c in zip(layers, caches):
            x = layer(x, None, c)
        return x

    def now(h):
        placeholder, view = staging.buffer("next", (1, 1, H), np.uint16)
        out = run(placeholder.view(mx.bfloat16), caches_now)  # built ahead, as prebuild does
        time.sleep(0.001)
        t = time.perf_counter()
        np.copyto(view, h)
        host = wire.read_back([out], [c.state for c in caches_now])[0]
        return time.perf_counter() - t, host.copy()

    def cold(h):
        time.sleep(0.001)
        t = time.perf_counter()
        out = run(wire.to_device(h, pb.BFLOAT16), caches_cold)
        host = wire.read_back([out], [c.state for c in caches_cold])[0]
        return time.perf_counter() - t, host.copy()

    def prelaunched(h):
        step, x = gate.open_input(n_words)
        out = run(x.view(mx.bfloat16).reshape(1, 1, H), caches_pre)
        done = gate.output(out.reshape(-1).view(mx.uint32))
        mx.async_eval(done, [c.state for c in caches_pre])
        time.sleep(0.001)
        t = time.perf_counter()
        gate.open(step, h)
        mx.eval(done)
        dt = time.perf_counter() - t
        assert gate.went(step), "the gate gave up"
        return dt, gate.result(n_words).view(np.uint16).copy()

    ways = {"now": now, "cold": cold, "prelaunched": prelaunched} if cuda else {"now": now, "cold": cold}
    times = {k: [] for k in ways}
    same = True
    for step in range(args.steps + 20):
        h = inputs[step % len(inputs)]
        outs = {}
        for name, fn in ways.items():
            dt, outs[name] = fn(h)
            if step >= 20:
                times[name].append(dt * 1e6)
        same &= all(np.array_equal(outs["now"], o) for o in outs.values())
        if caches_now[0].offset > 900:
            for c in caches_now + caches_pre + caches_cold:
                c.trim(c.offset - 40)
    report = {"model": args.model, "layers": args.layers, "same_bytes": same,
              "us": {k: round(statistics.median(v), 1) for k, v in times.items()},
              "p90_us": {k: round(float(np.percentile(v, 90)), 1) for k, v in times.items()}}
    print(json.dumps(report), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
