"""A stage span's decode step split into building its graph (Python, the GPU
idle) and evaluating it, on a node's ``StageStore`` and on mlx-lm's own
layers, in one process; and what starting the GPU early does (``kick``: the
first layer set running as soon as it is built, the rest then built while it
runs); then what the node adds around the span: packing and reading back its
output with the gates' ids, the routing counts, and the whole request as the
data plane serves it (parse, decode into staging, forward, encode, serialize).

    python3 benchmarks/spanbuild.py MODEL [--span 0 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx


def _median_us(fn, n: int = 200, warm: int = 20) -> float:
    from mlxcosts import timed

    return timed(fn, n, warm)


def _request_pieces(core, frames: list[bytes], caches: list, n: list[int], trials: int = 300) -> dict:
    """Mean µs of each piece of ``core``'s stage request: parse, the hidden
    states decoded into staging, the span's forward, the reply's output
    encoded, the rest of the request (validation, counters), serialize."""
    from breakdown import _Timer, _TimedModule

    from expertmesh import wire
    from expertmesh.nodes import core as core_module
    from expertmesh.v1 import expertmesh_pb2 as pb

    timer = _Timer()
    saved = core_module.wire, core.stages.forward
    core_module.wire = _TimedModule(wire, timer, {"decode": "decode", "encode_into": "encode"})
    core.stages.forward = timer.wrap("forward", saved[1])
    parse = serialize = total = 0.0
    try:
        for i in range(trials + 20):
            if i == 20:
                timer.clear()
                parse = serialize = total = 0.0
            n[0] += 1
            if n[0] % 300 == 0:
                for c in caches:
                    c.trim(c.offset - 16)
            t0 = time.perf_counter()
            req = pb.ForwardRequest.FromString(frames[n[0] % len(frames)])
            t1 = time.perf_counter()
            reply = core.forward(req)
            t2 = time.perf_counter()
            reply.SerializeToString()
            t3 = time.perf_counter()
            parse, serialize, total = parse + t1 - t0, serialize + t3 - t2, total + t3 - t0
    finally:
        core_module.wire, core.stages.forward = saved
    out = {f"request_{k}_us": timer.spent[k] / trials * 1e6 for k in ("decode", "forward", "encode")}
    out.update(request_parse_us=parse / trials * 1e6, request_serialize_us=serialize / trials * 1e6,
               request_mean_us=total / trials * 1e6)
    out["request_other_us"] = out["request_mean_us"] - sum(
        out[f"request_{k}_us"] for k in ("parse", "decode", "forward", "encode", "serialize"))
    return out


def measure(model: Path, start: int, end: int) -> dict:
    """The node's figures on an MLX worker thread, as a node runs its span
    (loaded, fed and evaluated on one thread); then mlx-lm's layers here."""
    from expertmesh.worker import MLXWorker

    worker = MLXWorker("spanbuild")
    try:
        r = worker.run(_node, model, start, end)
    finally:
        worker.close()
    r.update(_mlxlm(model, start, end))
    r["device"] = str(mx.default_device())
    return r


def _node(model: Path, start: int, end: int) -> dict:
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.nodes.stages import StageStore
    from expertmesh.nodes.store import ExpertStore

    r: dict = {"span": [start, end]}
    st = StageStore(ExpertStore(Checkpoint(model)))
    st.assign([(start, end)])
    span = st.spans[start]
    H = st.adapter.hidden_size
    st.forward(start, mx.zeros((1, 16, H), mx.bfloat16), [1], [])
    caches = span.caches((1,))
    xs = [mx.random.normal((1, 1, H)).astype(mx.bfloat16) for _ in range(16)]
    mx.eval(xs)
    n = [0]

    def nxt():
        n[0] += 1
        if n[0] % 300 == 0:  # keep the KV short, as in a benchmark's trial
            for c in caches:
                c.trim(c.offset - 16)
        return xs[n[0] % 16]

    def build(x):
        span.routing.begin()
        return span._layers(x, span.mask(x, caches[0]), caches)

    def states():
        return [c.state for c in caches]

    built = {}

    def only_build():
        built["y"] = build(nxt())

    def eval_built():
        mx.eval(built.pop("y"), states())

    def serial():
        mx.eval(build(nxt()), states())

    def kick():
        x = nxt()
        span.routing.begin()
        mask = span.mask(x, caches[0])
        x = span.layers[0](x, mask, caches[0])
        mx.async_eval(x)
        for layer, c in zip(span.layers[1:], caches[1:]):
            x = layer(x, mask, c)
        mx.eval(x, states())

    def forward():
        st.forward(start, nxt(), [1], [])

    def read():  # serial, plus packing the output with the gates' ids and reading both back
        x = nxt()
        span._read(build(x), states())

    def read_take():  # read, plus the routing counts the reply carries
        x = nxt()
        _, _, ids = span._read(build(x), states())
        span.routing.take(ids)

    # the node's whole request as its data plane serves it: parse, decode into staging, forward, encode, serialize
    from expertmesh import wire
    from expertmesh.nodes.core import NodeCore
    from expertmesh.v1 import expertmesh_pb2 as pb
    import numpy as np

    core = NodeCore("spanbuild", st.store, 1 << 40, None, st)
    rng = np.random.default_rng(0)
    frames = [pb.ForwardRequest(request_id=i + 10, stage=pb.StageRequest(
        layer=start, sequences=[1], hidden=wire.encode_numpy(
            wire.from_float32(rng.standard_normal((1, 1, H)).astype(np.float32), pb.BFLOAT16), pb.BFLOAT16)
    )).SerializeToString() for i in range(16)]

    def request():
        n[0] += 1
        if n[0] % 300 == 0:
            for c in caches:
                c.trim(c.offset - 16)
        core.forward(pb.ForwardRequest.FromString(frames[n[0] % 16])).SerializeToString()

    tensors = [pb.ForwardRequest.FromString(f).stage.hidden for f in frames]

    def staged_input():  # the span fed as a node's request feeds it: the bytes written into this thread's staging
        nxt()  # the counter, and the KV kept short
        st.forward(start, wire.decode(tensors[n[0] % 16], "hidden", core._staging(), "stage"), [1], [])

    def fresh_input():  # ... or into a fresh array
        nxt()  # the counter, and the KV kept short
        st.forward(start, wire.decode(tensors[n[0] % 16], "hidden"), [1], [])

    for gc_on in (True,):  # (False,) too: the cyclic collector measured no difference on the H200
        (gc.enable if gc_on else gc.disable)()
        tag = "" if gc_on else "_nogc"
        # build alone, then evaluate what was built (two timings of one step)
        b, e = [], []
        for i in range(220):
            t0 = time.perf_counter()
            only_build()
            t1 = time.perf_counter()
            eval_built()
            t2 = time.perf_counter()
            if i >= 20:
                b.append(t1 - t0)
                e.append(t2 - t1)
        r[f"node_build_us{tag}"] = statistics.median(b) * 1e6
        r[f"node_eval_us{tag}"] = statistics.median(e) * 1e6
        r[f"node_serial_us{tag}"] = _median_us(serial)
        r[f"node_kick_us{tag}"] = _median_us(kick)
        r[f"node_forward_us{tag}"] = _median_us(forward)
        r[f"node_read_us{tag}"] = _median_us(read)
        r[f"node_read_take_us{tag}"] = _median_us(read_take)
        r[f"node_forward_staged_input_us{tag}"] = _median_us(staged_input)
        r[f"node_forward_fresh_input_us{tag}"] = _median_us(fresh_input)
        r[f"node_request_us{tag}"] = _median_us(request)
        r.update(_request_pieces(core, frames, caches, n))
        print({k: round(v) for k, v in r.items() if k.endswith(tag + "_us") or k.endswith("_us" + tag)}, flush=True)
    gc.enable()
    st.close()
    return r


def _mlxlm(model: Path, start: int, end: int) -> dict:
    from requestprof import mlxlm_layers

    r: dict = {}
    step, pipelined = mlxlm_layers(model, start, end)
    b, e = [], []
    for i in range(220):
        t0 = time.perf_counter()
        y = step()
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        if i >= 20:
            b.append(t1 - t0)
            e.append(t2 - t1)
    r["mlxlm_build_us"] = statistics.median(b) * 1e6
    r["mlxlm_eval_us"] = statistics.median(e) * 1e6
    r["mlxlm_serial_us"] = _median_us(lambda: mx.eval(step()))
    r["mlxlm_pipelined_us"] = _median_us(pipelined)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--span", type=int, nargs=2, default=(0, 6))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    r = measure(args.model, *args.span)
    for k, v in r.items():
        print(f"{k:<28} {v}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
