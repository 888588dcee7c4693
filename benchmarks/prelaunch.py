"""What a node's span decode step costs once its kernels are launched before
its input arrives, against the node's way now, in one process.

    python3 benchmarks/prelaunch.py MODEL [--layers 6] [--out FILE]

A node evaluates each decode step when its request comes: MLX's CUDA backend
then encodes and launches every kernel of the span while the router waits.
Here the step is built and set running (``mx.async_eval``) right after the
previous reply, its first kernel waiting on the GPU for a word in pinned host
memory (``expertmesh.hostcopy``'s kind); the request writes its input and
that word, and only the GPU's own time is left to wait for. Medians in µs,
the ways alternating step by step, a 1 ms pause before each (the network):

- ``now``: the node's path (step built ahead on a staged placeholder; input
  written in place; evaluated, read back through pinned memory);
- ``cold``: the step built and evaluated when the input comes;
- ``prelaunched``: the step already running, waiting on its trigger.

Checks that both ways give the same bytes. CUDA only.
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

LIMIT_NS = 20_000_000  # a trigger that does not come within this is given up (status 2)

_GATE = """
    __shared__ unsigned int go;
    volatile unsigned int* ctl = reinterpret_cast<volatile unsigned int*>(
        (static_cast<unsigned long long>(addr[1]) << 32) | addr[0]);
    if (threadIdx.x == 0) {
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        t = t0;
        while (ctl[0] != want[0] && t - t0 < LIMIT) { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); }
        go = ctl[0] == want[0] ? 1u : 2u;
        if (blockIdx.x == 0) { ctl[1] = go; }
    }
    __syncthreads();
    __threadfence_system();
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n[0]) { dst[i] = ctl[4 + i]; }
"""


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
    from expertmesh.staging import Staging
    from expertmesh.v1 import expertmesh_pb2 as pb

    assert hostcopy.available(), "CUDA only (EXPERTMESH_PINNED=emulate runs the other two ways anywhere)"
    cuda = hostcopy._driver is not None and not isinstance(hostcopy._driver, hostcopy._Emulated)
    model, _ = load(args.model)
    layers = model.model.layers[:args.layers]
    H = model.args.hidden_size
    gate = None if not cuda else mx.fast.cuda_kernel(name="expertmesh_gate", input_names=["addr", "want", "n"], output_names=["dst"],
                               source=_GATE)
    ctl_buf = hostcopy._Buffer(hostcopy._driver, 1 << 16)  # an address of its own (the trigger, the input)
    ctl = ctl_buf.words
    n_words = H // 2
    read_buf = hostcopy._buffer(n_words * 4, True)

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
    epoch = [0]

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
        epoch[0] += 1
        want = mx.array(epoch[0], dtype=mx.uint32)
        x = gate(inputs=[ctl_buf.address, want, mx.array(n_words, dtype=mx.uint32)], output_shapes=[(n_words,)],
                 output_dtypes=[mx.uint32], grid=(n_words, 1, 1), threadgroup=(256, 1, 1),
                 template=[("LIMIT", LIMIT_NS)])[0]
        out = run(x.view(mx.bfloat16).reshape(1, 1, H), caches_pre)
        words = out.reshape(-1).view(mx.uint32)
        done = hostcopy._kernel(True)(inputs=[words, read_buf.address], output_shapes=[(1,)],
                                      output_dtypes=[mx.uint32], grid=(n_words, 1, 1), threadgroup=(256, 1, 1))[0]
        mx.async_eval(done, [c.state for c in caches_pre])
        time.sleep(0.001)
        t = time.perf_counter()
        ctl[4:4 + n_words] = h.reshape(-1).view(np.uint32)
        ctl[0] = epoch[0]
        mx.eval(done)
        dt = time.perf_counter() - t
        assert ctl[1] == 1, f"status {ctl[1]}"
        return dt, read_buf.words[:n_words].view(np.uint16).copy()

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
