"""The pieces of an expert-mode decode layer, each timed in this one process:
what the device charges for a sync and for each way of moving a small array
across, what a node's expert step costs written each way it can be, and what
the router's dense half costs per layer with infinitely fast nodes (with a
sync per layer, as the mesh must, and without). µs, medians.

    python benchmarks/hotpath.py MODEL [--json out.json]

MODEL: a checkpoint such as ``benchmarks/device.py`` writes (Qwen3-30B-A3B's
widths, 4-bit). The figures say which parts of a layer's time are the
device's, which MLX's and which the project's own Python.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlxcosts  # noqa: E402
from mlxcosts import Printed  # noqa: E402


# more calls than mlxcosts.py's default: these figures are compared A against B
timed = partial(mlxcosts.timed, n=200, warm=20)


def device_basics(r: dict, H: int) -> None:
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    mx.eval(x)
    host = np.asarray(x.view(mx.uint16))
    r["sync_trivial_us"] = timed(lambda: mx.eval(x + 1))
    r["h2d_4kb_us"] = timed(lambda: mx.eval(mx.array(host).view(mx.bfloat16) + 1))
    r["h2d_4kb_no_op_us"] = timed(lambda: mx.eval(mx.array(host)))
    r["h2d_scalar_us"] = timed(lambda: mx.eval(mx.array(np.int32(3)) + 1))
    y = x + 1
    mx.eval(y)
    r["d2h_4kb_memoryview_us"] = timed(lambda: np.frombuffer(memoryview(y.view(mx.uint16)), np.uint16).copy())
    r["eval_then_d2h_us"] = timed(lambda: (mx.eval(z := x * 2), bytes(memoryview(z.view(mx.uint16)))))


def staging(r: dict, H: int) -> None:
    """Ways to get 4 KB from the host into a kernel: a fresh array each time
    (what mx.array does), ``Staging.put``, and a kept array written in place
    through its address."""
    import ctypes

    from expertmesh.staging import Staging

    host = np.random.default_rng(0).integers(0, 1 << 16, H, dtype=np.uint16)
    r["stage_fresh_us"] = timed(lambda: mx.eval(mx.array(host).view(mx.bfloat16) * 2))
    st = Staging()
    r["stage_staging_put_us"] = timed(lambda: mx.eval(st.put(0, host).view(mx.bfloat16) * 2))
    a = mx.zeros((H,), mx.uint16)
    mx.eval(a)
    ptr = np.frombuffer(memoryview(a), np.uint16).ctypes.data

    def write_and_use():
        ctypes.memmove(ptr, host.ctypes.data, host.nbytes)
        mx.eval(a.view(mx.bfloat16) * 2)

    r["stage_inplace_us"] = timed(write_and_use)
    out = (a.view(mx.bfloat16) * 2)
    mx.eval(out)
    ok = np.array_equal(np.frombuffer(memoryview(out.view(mx.uint16)), np.uint16),
                        np.asarray((mx.array(host).view(mx.bfloat16) * 2).view(mx.uint16)))
    r["stage_inplace_correct"] = bool(ok)


def node_step(r: dict, H: int, I: int, E: int, K: int) -> None:
    from mlx_lm.models.switch_layers import SwitchGLU

    from expertmesh.nodes import store
    from expertmesh.v1 import expertmesh_pb2 as pb

    mlp = SwitchGLU(H, I, E)
    nn.quantize(mlp, group_size=64, bits=4)
    mx.eval(mlp.parameters())
    layer = store._Layer(list(range(E)), np.arange(E, dtype=np.int32), mlp, 0)
    rng = np.random.default_rng(0)
    held = rng.permutation(E)[:K // 2].astype(np.int32)
    x = mx.random.normal((1, H)).astype(mx.bfloat16)
    mx.eval(x)
    hidden = np.asarray(x.view(mx.uint16))
    tok = np.zeros(K // 2, np.int32)
    w = np.full(K // 2, 1.0 / K, np.float32)
    code = pb.BFLOAT16

    def full():
        buf, layout = store._pack(hidden, code, tok, held, w)
        out = layer.step(buf, layout, 1)
        mx.eval(out)
        return np.frombuffer(memoryview(out.view(mx.uint16)), np.uint16).copy()

    r["node_step_whole_us"] = timed(full)
    buf, layout = store._pack(hidden, code, tok, held, w)
    r["node_step_pack_us"] = timed(lambda: store._pack(hidden, code, tok, held, w))
    dbuf = mx.array(np.asarray(buf))
    mx.eval(dbuf)
    r["node_step_device_input_us"] = timed(lambda: mx.eval(layer.step(dbuf, layout, 1)))
    r["node_step_graph_only_us"] = timed(lambda: layer.step(dbuf, layout, 1))
    dtok, dlids, dw = mx.array(tok), mx.array(held), mx.array(w)
    mx.eval(dtok, dlids, dw)
    comb = mx.compile(lambda h, t, l, ww: store._combine(mlp, h, t, l, ww))
    r["node_combine_compiled_us"] = timed(lambda: mx.eval(comb(x, dtok, dlids, dw)))
    r["node_combine_uncompiled_us"] = timed(lambda: mx.eval(store._combine(mlp, x, dtok, dlids, dw)))

    inds = mx.array(held.reshape(1, 1, -1))
    ws = mx.array(w.reshape(1, 1, -1))
    x3 = x.reshape(1, 1, H)

    def slots(h, i, ww):
        return (mlp(h, i) * ww[..., None]).sum(axis=-2).astype(h.dtype)

    sl = mx.compile(slots)
    r["node_slots_compiled_us"] = timed(lambda: mx.eval(sl(x3, inds, ws)))
    r["node_slots_uncompiled_us"] = timed(lambda: mx.eval(slots(x3, inds, ws)))
    xe = mx.expand_dims(x3, (-2, -3))
    r["gather_qmm_one_proj_us"] = timed(lambda: mx.eval(mlp.gate_proj(xe, inds)))
    r["gather_qmm_three_proj_us"] = timed(lambda: mx.eval(mlp(x3, inds)))
    dense = nn.QuantizedLinear(H, I * 2, bits=4, group_size=64)
    mx.eval(dense.parameters())
    r["dense_qmm_2048x1536_us"] = timed(lambda: mx.eval(dense(x)))


def router_layers(r: dict, model: Path) -> None:
    from mlx_lm.models.cache import make_prompt_cache

    from expertmesh import compiled, wire
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.router.dense import load_dense
    from expertmesh.router.dispatcher import _to_host

    for compile_ in (True, False):
        compiled.configure(compile_)
        dense, _, adapter = load_dense(Checkpoint(model))
        moe = len(adapter.moe_layers)
        tag = "compiled" if compile_ else "uncompiled"

        def sync_stub(layer, x, inds, scores):
            hidden, _, _ = _to_host(x, inds, scores)
            return wire.from_numpy(hidden, wire.wire_dtype(x.dtype)).reshape(x.shape)

        def sync_only(layer, x, inds, scores):
            mx.eval(x, inds, scores)
            return x

        def lazy_stub(layer, x, inds, scores):
            return x * 0

        for name, stub in (("sync_roundtrip", sync_stub), ("sync", sync_only), ("lazy", lazy_stub)):
            adapter.attach(dense, stub)
            cache = make_prompt_cache(dense)
            mx.eval(dense(mx.array([[1] * 16]), cache=cache))
            tokens = mx.array([[7]])

            def one():
                mx.eval(dense(tokens, cache=cache))

            us = timed(one, n=100, warm=10)
            r[f"router_token_{name}_{tag}_us"] = us
            r[f"router_per_layer_{name}_{tag}_us"] = us / moe
        del dense
    compiled.configure(True)
    from mlx_lm import load

    local, _ = load(str(model))
    cache = make_prompt_cache(local)
    mx.eval(local(mx.array([[1] * 16]), cache=cache))
    tokens = mx.array([[7]])
    us = timed(lambda: mx.eval(local(tokens, cache=cache)), n=100, warm=10)
    r["local_token_us"] = us
    r["local_per_layer_us"] = us / moe

    def pipelined():  # as mlx_lm.generate does: the next step is built while this one runs
        y = local(tokens, cache=cache)
        mx.async_eval(y)
        return y
    prev = pipelined()
    def step():
        nonlocal prev
        y = pipelined()
        mx.eval(prev)
        prev = y
    r["local_token_async_us"] = timed(step, n=100, warm=10)


def threads(r: dict) -> None:
    a, b = socket.socketpair()
    def echo():
        while (m := b.recv(8192)):
            b.sendall(m)
    t = threading.Thread(target=echo, daemon=True)
    t.start()
    msg = b"x" * 4200
    def rt():
        a.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(a.recv(8192))
    r["socketpair_thread_roundtrip_us"] = timed(rt, n=1000)
    a.close()
    import queue
    q1, q2 = queue.SimpleQueue(), queue.SimpleQueue()
    def pong():
        while (v := q1.get()) is not None:
            q2.put(v)
    t2 = threading.Thread(target=pong, daemon=True)
    t2.start()
    r["queue_thread_roundtrip_us"] = timed(lambda: (q1.put(1), q2.get()), n=1000)
    q1.put(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--parts", nargs="+", default=["basics", "staging", "node", "router", "threads", "ab"])
    args = parser.parse_args()
    cfg = json.loads((args.model / "config.json").read_text())
    H, I, E, K = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    r = Printed(device=str(mx.default_device()), hidden=H, experts=E, k=K)
    parts = {"basics": lambda: device_basics(r, H), "staging": lambda: staging(r, H), "node": lambda: node_step(r, H, I, E // 2, K),
             "router": lambda: router_layers(r, args.model), "threads": lambda: threads(r),
             "ab": lambda: r.update(ab_transfers(args.model))}
    try:
        for p in args.parts:
            try:
                parts[p]()
            except Exception as e:  # noqa: BLE001 the other parts still run
                import traceback
                traceback.print_exc()
                r[f"error_{p}"] = f"{type(e).__name__}: {e}"
    finally:
        if args.json:
            args.json.write_text(json.dumps(r, indent=2))



def ab_transfers(model: Path, rounds: int = 5) -> dict:
    """The two transfer changes, each against what it replaced, in alternating
    rounds in this one process: (1) a node's decode request (its NodeCore, the
    layers taken in turn as a decode does) with its input staged or made
    fresh; (2) the router's dense decode token with infinitely fast experts,
    its layer output staged or fresh and its routed tokens read back packed or
    as three arrays. µs, the median of each side's round medians."""
    from mlx_lm.models.cache import make_prompt_cache

    import breakdown
    from expertmesh import wire
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.nodes import core
    from expertmesh.router import dispatcher
    from expertmesh.router.dense import load_dense
    from expertmesh.staging import Staging

    r = Printed()
    # (1) the node: node_breakdown's request loop, staging on and off
    saved = core.NodeCore._staging
    node_rounds = {"staged": [], "fresh": []}
    for i in range(rounds):
        for side in ("staged", "fresh"):
            core.NodeCore._staging = saved if side == "staged" else (lambda self: None)
            node_rounds[side].append(breakdown.node_breakdown(model, trials=200)["node_request_us"])
    core.NodeCore._staging = saved
    for side, v in node_rounds.items():
        r[f"ab_node_request_{side}_us"] = statistics.median(v)

    # (2) the router's side of a layer, with the dispatcher's own transfer code
    dense, _, adapter = load_dense(Checkpoint(model))
    moe = len(adapter.moe_layers)
    staging = Staging()

    def three_reads(x, inds, scores):
        H, k = x.shape[-1], inds.shape[-1]
        mx.eval(x, inds, scores)
        return (wire.to_numpy(x).reshape(-1, H), np.asarray(inds).reshape(-1, k).astype(np.int32, copy=False),
                wire.to_float32(wire.to_numpy(scores), wire.wire_dtype(scores.dtype)).reshape(-1, k))

    def stub(read, staged):
        def call(layer, x, inds, scores):
            hidden, _, _ = read(x, inds, scores)
            code = wire.wire_dtype(x.dtype)
            return wire.from_numpy(hidden, code, *((staging, layer) if staged else ())).reshape(x.shape)
        return call

    sides = {"new": stub(dispatcher._to_host, True), "staged_three_reads": stub(three_reads, True),
             "packed_fresh": stub(dispatcher._to_host, False), "old": stub(three_reads, False)}
    cache = make_prompt_cache(dense)
    adapter.attach(dense, sides["old"])
    mx.eval(dense(mx.array([[1] * 16]), cache=cache))
    tokens = mx.array([[7]])
    router_rounds = {s: [] for s in sides}
    for i in range(rounds):
        for side, call in sides.items():
            adapter.attach(dense, call)
            router_rounds[side].append(timed(lambda: mx.eval(dense(tokens, cache=cache)), n=30, warm=3) / moe)
    for side, v in router_rounds.items():
        r[f"ab_router_layer_{side}_us"] = statistics.median(v)
    return dict(r)


if __name__ == "__main__":
    main()
