"""What MLX's building blocks of one hop cost on this machine, µs each:
a sync, numpy in and out, and a node's expert step at Qwen3-30B-A3B's
widths (64 of 128 experts held, 4-bit) in the ways it can be written.

    python benchmarks/mlxcosts.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

H, I, E, K = 2048, 768, 64, 8


def timed(fn, n: int = 50, warm: int = 10) -> float:
    """Median µs of ``fn()`` after ``warm`` calls."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def rounds(fns: dict, n: int = 100, warm: int = 10, repeat: int = 5) -> dict[str, float]:
    """µs per call of each function, the median of ``repeat`` alternating rounds' medians."""
    for f in fns.values():
        for _ in range(warm):
            f()
    per = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            v = []
            for _ in range(n):
                t = time.perf_counter()
                f()
                v.append(time.perf_counter() - t)
            per[k].append(statistics.median(v))
    return {k: statistics.median(v) * 1e6 for k, v in per.items()}


def first_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    r = Printed(device=str(mx.default_device()))
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    host = np.asarray(x.view(mx.uint16))
    mx.eval(x)
    r["eval_trivial_us"] = timed(lambda: mx.eval(x + 1))
    r["eval_chain20_us"] = timed(lambda: mx.eval(_chain(x, 20)))
    chain = mx.compile(lambda a: _chain(a, 20))
    r["eval_chain20_compiled_us"] = timed(lambda: mx.eval(chain(x)))
    r["numpy_in_and_eval_us"] = timed(lambda: mx.eval(mx.array(host).view(mx.bfloat16) + 1))
    r["numpy_in_4_arrays_us"] = timed(lambda: mx.eval([mx.array(host) + 1 for _ in range(4)]))
    y = x + 1
    mx.eval(y)
    r["numpy_out_memoryview_us"] = timed(lambda: np.frombuffer(memoryview(y.view(mx.uint16)), np.uint16).copy())
    r["eval_then_out_us"] = timed(lambda: (mx.eval(z := x * 2), bytes(memoryview(z.view(mx.uint16)))))

    mlp = SwitchGLU(H, I, E)
    nn.quantize(mlp, group_size=64, bits=4)
    mx.eval(mlp.parameters())
    rng = np.random.default_rng(0)
    ids = rng.permutation(E)[:K // 2].astype(np.int32)  # the 4 of 8 slots this node holds

    def pairs(P):  # the node's way: (token, expert) pairs, padded to a power of two
        tok = mx.zeros((P,), mx.int32)
        lids = mx.array(np.resize(ids, P))
        w = mx.array(np.full(P, 0.125, np.float32))
        return tok, lids, w

    def combine(h, tok, lids, w):
        y = mlp(h[tok], lids[:, None])[:, 0, :]
        return mx.zeros(h.shape, dtype=mx.float32).at[tok].add(y * w[:, None]).astype(h.dtype)

    def slots(h, inds, w):  # mlx-lm's way: every slot of every token, weighted sum over slots
        return (mlp(h, inds) * w[..., None]).sum(axis=-2).astype(h.dtype)

    step = mx.compile(combine)
    slot_step = mx.compile(slots)
    tok, lids, w = pairs(4)
    mx.eval(tok, lids, w)
    inds = mx.array(np.resize(ids, (1, K)))
    ws = mx.full((1, K), 0.125)
    r["expert_step_first_call_us"] = first_call(lambda: mx.eval(step(x, tok, lids, w)))
    r["expert_step_compiled_us"] = timed(lambda: mx.eval(step(x, tok, lids, w)))
    r["expert_step_uncompiled_us"] = timed(lambda: mx.eval(combine(x, tok, lids, w)))
    r["expert_step_with_inputs_us"] = timed(lambda: mx.eval(step(mx.array(host).view(mx.bfloat16), *pairs(4))))
    r["expert_slots_compiled_us"] = timed(lambda: mx.eval(slot_step(x, inds, ws)))
    r["expert_slots_uncompiled_us"] = timed(lambda: mx.eval(slots(x, inds, ws)))
    x8 = mx.random.normal((8, H)).astype(mx.bfloat16)
    inds8, ws8 = mx.array(rng.integers(0, E, (8, K)).astype(np.int32)), mx.full((8, K), 0.125)
    r["expert_slots_8_tokens_first_call_us"] = first_call(lambda: mx.eval(slot_step(x8, inds8, ws8)))
    r["expert_slots_8_tokens_us"] = timed(lambda: mx.eval(slot_step(x8, inds8, ws8)))
    r["gather_qmm_one_proj_us"] = timed(lambda: mx.eval(mlp.gate_proj(x[:, None, None, :], inds)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


class Printed(dict):
    """Figures printed as they come, so a run cut short shows what it measured."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key:<44} {value:10.1f}" if isinstance(value, float) else f"{key:<44} {value}", flush=True)


def _chain(a: mx.array, n: int) -> mx.array:
    for _ in range(n):
        a = a * 1.001 + 0.001
    return a


if __name__ == "__main__":
    main()
