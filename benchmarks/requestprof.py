"""Where a node's request time goes, on the device: its NodeCore in this
process, each piece of an expert request and of a stage (pipeline) request
timed alone, against what mlx-lm spends on the same layers. µs, medians of
alternating rounds; a cProfile of each full request beside them.

    python benchmarks/requestprof.py MODEL [--parts kernels experts stage prefill] [--json out.json] [--profile DIR]

``prefill``: a 512-token prompt's pieces (``--prefill-tokens``; in prefillprof.py), the node's
expert and stage requests and the router's side of an expert-mode layer,
against mlx-lm's own layer on the same tokens.

MODEL: a checkpoint such as ``benchmarks/device.py`` writes (Qwen3-30B-A3B's
widths, 4-bit, 12 layers).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlxcosts import Printed, rounds  # noqa: E402

from expertmesh import fused, wire  # noqa: E402
from expertmesh.checkpoint import Checkpoint  # noqa: E402
from expertmesh.nodes.core import NodeCore  # noqa: E402
from expertmesh.nodes.store import ExpertStore, _pack  # noqa: E402
from expertmesh.v1 import expertmesh_pb2 as pb  # noqa: E402
from expertmesh.worker import MLXWorker  # noqa: E402


def put(r: dict, figures: dict) -> None:
    for k, v in figures.items():
        r[k] = v  # printed as it comes


def profiled(fn, calls: int, path: Path | None, name: str) -> None:
    if path is None:
        return
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    (path / f"{name}.txt").write_text(s.getvalue())


def experts(r: dict, model: Path, prof: Path | None) -> None:
    store = ExpertStore(Checkpoint(model))
    a = store.adapter
    E, k, H = a.num_experts, a.top_k, a.hidden_size
    mine = list(range(E // 2))
    store.assign({layer: mine for layer in a.moe_layers})
    node = NodeCore("prof", store, 1 << 40, MLXWorker("prof"))
    rng = np.random.default_rng(0)
    layers = list(a.moe_layers)
    reqs, inputs = [], []
    for i, layer in enumerate(layers):
        held = rng.choice(len(mine), k // 2, replace=False)  # half the slots this node's, as with 2 nodes
        ids = np.concatenate([held, np.full(k - k // 2, -1)]).reshape(1, k).astype(np.int32)
        w = np.where(ids >= 0, 1.0 / k, 0.0).astype(np.float32)
        hidden = wire.from_float32(rng.standard_normal((1, H)).astype(np.float32), pb.BFLOAT16)
        req = pb.ForwardRequest(request_id=i + 1, expert=pb.ExpertRequest(
            layer=layer, hidden=wire.encode_numpy(hidden, pb.BFLOAT16), expert_ids=wire.encode_numpy(ids, pb.INT32),
            weights=wire.encode_numpy(w, pb.FLOAT32)))
        reqs.append(req.SerializeToString())
        pair = np.flatnonzero(ids.reshape(-1) >= 0)
        buf, layout = _pack(hidden, pb.BFLOAT16, (pair // k).astype(np.int32),
                            store.layers[layer].local[ids.reshape(-1)[pair]], w.reshape(-1)[pair])
        dbuf = mx.array(np.asarray(buf))
        mx.eval(dbuf)
        inputs.append((layer, hidden, ids, w, dbuf, layout))
    turn = [0]

    def nxt(same: bool = False):
        i = 0 if same else turn[0] % len(layers)
        turn[0] += 1
        return i

    def request(same=False):
        node.forward(pb.ForwardRequest.FromString(reqs[nxt(same)]))

    def fw_eval(same=False):
        layer, hidden, ids, w, _, _ = inputs[nxt(same)]
        mx.eval(store.forward_wire(layer, hidden, pb.BFLOAT16, ids, w, node._staging()))

    def step_eval(same=False):
        layer, _, _, _, dbuf, layout = inputs[nxt(same)]
        mx.eval(store.layers[layer].step(dbuf, layout, 1))

    def step_async(same=False):  # graph built and queued, no wait: what the GPU work alone costs when pipelined
        layer, _, _, _, dbuf, layout = inputs[nxt(same)]
        mx.async_eval(store.layers[layer].step(dbuf, layout, 1))

    def step_graph(same=False):
        layer, _, _, _, dbuf, layout = inputs[nxt(same)]
        store.layers[layer].step(dbuf, layout, 1)

    def step_eval_read():
        layer, _, _, _, dbuf, layout = inputs[nxt()]
        out = store.layers[layer].step(dbuf, layout, 1)
        mx.eval(out)
        wire.encode(out)

    def run():
        fns = {"req_cycle": request, "req_same": lambda: request(True), "fw_eval_cycle": fw_eval,
               "fw_eval_same": lambda: fw_eval(True), "step_eval_cycle": step_eval,
               "step_eval_same": lambda: step_eval(True), "step_graph_cycle": step_graph,
               "step_eval_read_cycle": step_eval_read}
        put(r, {f"experts_{k}_us": v for k, v in rounds(fns).items()})
        # the GPU's own time for a step when steps are queued back to back
        for _ in range(10):
            step_async()
        mx.synchronize()
        t = time.perf_counter()
        for _ in range(240):
            step_async()
        mx.synchronize()
        r["experts_step_pipelined_cycle_us"] = (time.perf_counter() - t) / 240 * 1e6
        # the first host read of a step's output, alone
        v = []
        for i in range(200):
            layer, _, _, _, dbuf, layout = inputs[i % len(layers)]
            out = store.layers[layer].step(dbuf, layout, 1)
            mx.eval(out)
            t = time.perf_counter()
            wire.encode(out)
            v.append(time.perf_counter() - t)
        r["experts_first_read_us"] = statistics.median(v) * 1e6
        profiled(request, 300, prof, "experts_request")

    node.worker.run(run)
    node.worker.close()


def mlxlm_layers(model: Path, start: int, end: int):
    """mlx-lm's own decoder layers ``[start, end)`` of ``model``, loaded in this
    process, their caches holding a 16-token prompt (trimmed back to it every
    400 steps). Returns ``step()``, one decode step's graph, unevaluated, and
    ``pipelined()``, one step as ``generate`` runs them: set running before
    the step before it is waited for."""
    from mlx_lm import load
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import make_prompt_cache

    local, _ = load(str(model))
    H = local.args.hidden_size
    layers = local.model.layers[start:end]
    cache = make_prompt_cache(local)[start:end]
    h = mx.random.normal((1, 16, H)).astype(mx.bfloat16)
    mask = create_attention_mask(h, cache[0])
    for layer, c in zip(layers, cache):
        h = layer(h, mask, c)
    mx.eval(h)
    xs = [mx.random.normal((1, 1, H)).astype(mx.bfloat16) for _ in range(16)]
    mx.eval(xs)
    n = [0]

    def step() -> mx.array:
        n[0] += 1
        if n[0] % 400 == 0:
            for c in cache:
                c.trim(c.offset - 16)
        h = xs[n[0] % 16]
        for layer, c in zip(layers, cache):
            h = layer(h, None, c)
        return h

    prev: list[mx.array] = []

    def pipelined() -> None:
        y = step()
        mx.async_eval(y)
        if prev:
            mx.eval(prev.pop())
        prev.append(y)

    return step, pipelined


def stage(r: dict, model: Path, prof: Path | None, span: tuple[int, int] = (0, 7)) -> None:
    store = ExpertStore(Checkpoint(model))
    worker = MLXWorker("prof-stage")
    node = NodeCore("prof", store, 1 << 40, worker)
    H = store.adapter.hidden_size
    start, end = span
    rng = np.random.default_rng(0)

    plain = NodeCore("prof-unfused", ExpertStore(Checkpoint(model)), 1 << 40, worker)

    def run():
        node.stages.assign([span])
        fused.configure(False)  # the same span with mlx-lm's SwitchGLU as it is, for the A/B
        try:
            plain.stages.assign([span])
        finally:
            fused.configure(True)
        prompt = wire.from_float32(rng.standard_normal((1, 16, H)).astype(np.float32), pb.BFLOAT16)
        seq = [0]

        def req(hidden, rid):
            return pb.ForwardRequest(request_id=rid, stage=pb.StageRequest(
                layer=start, hidden=wire.encode_numpy(hidden, pb.BFLOAT16), sequences=[seq[0]])).SerializeToString()

        steps = [req(wire.from_float32(rng.standard_normal((1, 1, H)).astype(np.float32), pb.BFLOAT16), i + 2)
                 for i in range(16)]
        count = [0]

        def fresh_sequence():  # a new sequence every 400 steps keeps the KV short, as in a benchmark's trial
            for n in (node, plain):
                n.stages.release([seq[0]])
            seq[0] += 1
            for n in (node, plain):
                n.forward(pb.ForwardRequest.FromString(req(prompt, 1)))

        def stage_request():
            count[0] += 1
            if count[0] % 400 == 0:
                fresh_sequence()
            node.forward(pb.ForwardRequest.FromString(steps[count[0] % len(steps)]))

        dev = [mx.random.normal((1, 1, H)).astype(mx.bfloat16) for _ in range(16)]
        mx.eval(dev)

        def stage_direct(on=node):
            count[0] += 1
            if count[0] % 400 == 0:
                fresh_sequence()
            on.stages.forward(start, dev[count[0] % len(dev)], [seq[0]], [])

        fresh_sequence()
        put(r, {f"stage_{k}_us": v for k, v in rounds({
            "request": stage_request, "direct": stage_direct, "direct_unfused": lambda: stage_direct(plain)}).items()})
        profiled(stage_request, 300, prof, "stage_request")

    worker.run(run)
    worker.close()
    # mlx-lm: the same layers, in this process, a sync per step and pipelined
    step, pipelined = mlxlm_layers(model, start, end)
    put(r, {f"stage_mlxlm_{k}_us": v for k, v in rounds({"sync": lambda: mx.eval(step())}).items()})
    put(r, {f"stage_mlxlm_{k}_us": v for k, v in rounds({"pipelined": pipelined}).items()})
    r["stage_layers"] = end - start


def kernels(r: dict, model: Path, prof: Path | None) -> None:
    """A switch MLP's decode step, mlx-lm's SwitchGLU against the fused one,
    with a node's share of experts and with a whole layer's: same outputs?
    µs with a sync each, and per step when steps are queued back to back."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchGLU

    cfg = json.loads((model / "config.json").read_text())
    H, I, E, K = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"], cfg["num_experts_per_tok"]
    rng = np.random.default_rng(0)
    for name, experts, active in (("node", E // 2, K // 2), ("layer", E, K)):
        glu = SwitchGLU(H, I, experts)
        nn.quantize(glu, group_size=64, bits=4)
        glu.set_dtype(mx.bfloat16)
        mx.eval(glu.parameters())
        both = fused.FusedSwitchGLU(glu)
        xs = [mx.random.normal((1, 1, H)).astype(mx.bfloat16) for _ in range(8)]
        idx = [mx.array(rng.choice(experts, active, replace=False).reshape(1, 1, active).astype(np.int32))
               for _ in range(8)]
        mx.eval(xs, idx)
        r[f"kernels_{name}_fused_equal"] = all(mx.array_equal(glu(x, i), both(x, i)).item() for x, i in zip(xs, idx))
        turn = [0]

        def call(m, wait):
            turn[0] += 1
            y = m(xs[turn[0] % 8], idx[turn[0] % 8])
            (mx.eval if wait else mx.async_eval)(y)

        put(r, {f"kernels_{name}_{k}_us": v for k, v in rounds({
            "switchglu_sync": lambda: call(glu, True), "fused_sync": lambda: call(both, True)}).items()})
        for label, m in (("switchglu", glu), ("fused", both)):
            for _ in range(20):
                call(m, False)
            mx.synchronize()
            t = time.perf_counter()
            for _ in range(400):
                call(m, False)
            mx.synchronize()
            r[f"kernels_{name}_{label}_queued_us"] = (time.perf_counter() - t) / 400 * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="a folder for the cProfile text of each full request")
    parser.add_argument("--parts", nargs="+", default=["kernels", "experts", "stage"],
                        choices=["kernels", "experts", "stage", "prefill"])
    parser.add_argument("--prefill-tokens", type=int, default=512, help="the prompt's tokens for --parts prefill")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    r = Printed(device=str(mx.default_device()))
    parts = {"kernels": kernels, "experts": experts, "stage": stage,
             "prefill": lambda r, m, p: __import__("prefillprof").prefill(r, m, p, args.prefill_tokens)}
    try:
        for p in args.parts:
            try:
                parts[p](r, args.model, args.profile)
            except Exception as e:  # noqa: BLE001 the other parts still run
                import traceback
                traceback.print_exc()
                r[f"error_{p}"] = f"{type(e).__name__}: {e}"
    finally:
        if args.json:
            args.json.write_text(json.dumps(dict(r), indent=2))


if __name__ == "__main__":
    main()
