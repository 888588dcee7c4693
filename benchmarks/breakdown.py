"""Where an expert-mode decode token's time goes, per MoE layer: a router in
this process (its dispatcher timed from outside) over node processes, and a
node's own time per request (its NodeCore in this process, each phase timed
from outside: parse, decode, compute graph, eval, encode). The same 24-layer
checkpoint as ``make bench`` by default. Run it twice, with and without
``--no-compile``, to see what compiling decode steps gives.

    python benchmarks/breakdown.py [--nodes 2] [--tokens 64] [--rounds 3] [--scale --layers 12] [--no-compile]
    python benchmarks/breakdown.py --spans [...]   # an auto-mode token: its stage spans, piece by piece
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from expertmesh import compiled, wire
from expertmesh.options import GenerationOptions
from expertmesh.router import Router, RouterConfig
from expertmesh.router import dispatcher
from expertmesh.router.link import NodeLink
from expertmesh.testing.process import Process
from expertmesh.v1 import expertmesh_pb2 as pb
from run import PROMPT, bench_model

# what the router's figures are called (µs per MoE layer), in the order they are printed
EVAL, SEND, WAIT, ALL = ("router eval (attention, norms, gate; the sync and read-back)", "send (sendall per node)",
                         "wait for the node + read", "dispatcher, in all")


class _Timer:
    def __init__(self):
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.spent[name] += time.perf_counter() - t
                self.calls[name] += 1
        return wrapper

    def clear(self) -> None:
        self.spent.clear()
        self.calls.clear()


class _TimedModule:
    """A stand-in for ``module`` whose functions in ``names`` (attribute ->
    figure) are timed; every other attribute is the module's own."""

    def __init__(self, module, timer: _Timer, names: dict[str, str]):
        self._module = module
        for attr, figure in names.items():
            if hasattr(module, attr):
                setattr(self, attr, timer.wrap(figure, getattr(module, attr)))

    def __getattr__(self, name):
        return getattr(self._module, name)


def router_breakdown(model: Path, nodes: int, tokens: int, rounds: int, logs: Path, compile: bool = True,
                     prompt: str = PROMPT) -> dict:
    """µs per MoE layer of an expert-mode decode (prefill of the short prompt
    included); with a long ``prompt`` and ``tokens`` 1, of its prefill (and
    its first token's step), with ``ms_per_prompt`` and each figure's ms in all
    (``*_ms_prompt``)."""
    timer = _Timer()
    saved = dispatcher._to_host, NodeLink.submit, NodeLink.receive, dispatcher.Dispatcher.__call__
    dispatcher._to_host = timer.wrap(EVAL, saved[0])  # the layer's one evaluation, and its read-back
    NodeLink.submit = timer.wrap(SEND, saved[1])
    NodeLink.receive = timer.wrap(WAIT, saved[2])
    dispatcher.Dispatcher.__call__ = timer.wrap(ALL, saved[3])
    procs, router = [], None
    try:
        procs = [Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", "40", "--no-discovery",
                          "--compile" if compile else "--no-compile"], logs / f"breakdown-node{i}.log")
                 for i in range(nodes)]
        router = Router(RouterConfig(model=model, peers=[p.address(timeout=300) for p in procs], port=0,
                                     mode="expert"))
        router.connect()
        moe_layers = len(router.adapter.moe_layers)

        def generate() -> float:
            *_, last = router.generate(prompt, options=GenerationOptions(max_tokens=tokens))
            return last.generation_tps

        generate()  # warm-up: compiles, caches
        before = [link.stub.GetStats(pb.GetStatsRequest(), timeout=10) for link in router.links]
        timer.clear()
        t = time.perf_counter()
        tps = [generate() for _ in range(rounds)]
        wall = time.perf_counter() - t
        after = [link.stub.GetStats(pb.GetStatsRequest(), timeout=10) for link in router.links]
    finally:
        dispatcher._to_host, NodeLink.submit, NodeLink.receive, dispatcher.Dispatcher.__call__ = saved
        if router is not None:
            router.stop(grace=0)
        for p in procs:
            p.stop()
    layers = timer.calls[ALL]
    compute = sum(b.compute_seconds - a.compute_seconds for a, b in zip(before, after))
    requests = sum(b.forward_requests - a.forward_requests for a, b in zip(before, after))
    us = {name: timer.spent[name] / layers * 1e6 for name in (EVAL, SEND, WAIT, ALL)}
    node_us = compute / requests * 1e6
    per_prompt = {} if prompt == PROMPT else {
        "ms_per_prompt": wall / rounds * 1e3, "node_compute_ms_prompt": compute / rounds / nodes * 1e3,
        **{f"{key}_ms_prompt": timer.spent[name] / rounds * 1e3
           for key, name in (("router_eval", EVAL), ("send", SEND), ("wait_and_read", WAIT), ("dispatcher", ALL))}}
    return {
        **per_prompt,
        "decode_tps": statistics.median(tps),
        "ms_per_token": wall / (layers / moe_layers) * 1e3,
        "router_eval_us": us[EVAL],
        "send_us": us[SEND],
        "wait_and_read_us": us[WAIT],
        "requests_per_layer": requests / layers,
        "node_compute_us": node_us,  # each request, as the node reports it (nodes run in parallel)
        # the exchange beyond one node's own time (nodes compute in parallel): the wire both
        # ways, framing, parsing, the readers' wake-ups
        "wire_both_ways_us": us[SEND] + us[WAIT] - node_us,
        "dispatcher_other_us": us[ALL] - us[EVAL] - us[SEND] - us[WAIT],  # numpy prep, requests, combine
        "dispatcher_us": us[ALL],
        "outside_dispatcher_us": (wall - timer.spent[ALL]) / layers * 1e6,  # graphs, lm head, sampling, batching
    }


# what an auto-mode token's figures are called (µs per token), in the order they are printed
SPAN_ALL, SPAN_EVAL, SPAN_REQ, SPAN_RTT, SPAN_DECODE = (
    "span call, in all", "router eval before sending (the step's graph, the cache stand-in)",
    "request (read back, encode)", "round trip (send, node, reply)", "reply to an array")


def stage_breakdown(model: Path, nodes: int, tokens: int, rounds: int, logs: Path, mode: str = "auto",
                    streams: int = 1, prompt: str = PROMPT, node_args: tuple[str, ...] = (),
                    chains: bool = True, prefill_chunk: int | None = None) -> dict:
    """µs per forward pass of a router whose layers run as stage spans on
    node processes (``mode`` auto or pipeline), ``streams`` generating at
    once (one batch): each span's call timed from outside, piece by piece,
    against the node's own time from its replies. With a long ``prompt`` and
    ``tokens`` 1, the passes are its prefill's and its first token's
    (``ms_per_prompt``: the time of one). ``node_args``: more flags for each
    ``expertmesh node`` (``--no-prebuild`` for an A/B); ``chains`` False:
    consecutive spans relayed through the router's MLX one after the other,
    as before router/chain.py (an A/B); ``prefill_chunk``: the router's."""
    from expertmesh.router import chain, stages

    timer = _Timer()
    computes: list[float] = []
    saved = (stages.StageRuntime.run, stages.StageRuntime.submit, stages.StageRuntime.wait, chain.mx,
             chain._forward, chain.wire)

    def wait(self, link, pending, t0):
        reply, rtt = saved[2](self, link, pending, t0)
        if reply is not None:
            computes.append(reply.compute_seconds)
        return reply, rtt

    chain.mx = _TimedModule(mx, timer, {"eval": SPAN_EVAL})
    chain._forward = timer.wrap(SPAN_REQ, saved[4])
    chain.wire = _TimedModule(saved[5], timer, {"decode_numpy": SPAN_DECODE, "from_numpy": SPAN_DECODE})
    stages.StageRuntime.run = timer.wrap(SPAN_ALL, saved[0])
    stages.StageRuntime.submit = timer.wrap(SPAN_RTT, saved[1])
    stages.StageRuntime.wait = timer.wrap(SPAN_RTT, wait)
    procs, router = [], None
    try:
        procs = [Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", "40", "--no-discovery",
                          *node_args], logs / f"stagebreak-node{i}.log") for i in range(nodes)]
        router = Router(RouterConfig(model=model, peers=[p.address(timeout=300) for p in procs], port=0, mode=mode,
                                     **({} if prefill_chunk is None else {"prefill_chunk": prefill_chunk})))
        router.connect()
        if not chains:
            router.stage_runtime._chains = {}

        spans = sum(len(v) for v in router.plan.stages.values())

        def one() -> int:
            *_, last = router.generate(prompt, options=GenerationOptions(max_tokens=tokens))
            return last.generation_tokens

        def generate() -> tuple[float, int]:  # aggregate tokens/s, tokens
            t = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                made = sum(pool.map(lambda _: one(), range(streams)))
            return made / (time.perf_counter() - t), made

        generate()  # warm-up: compiles, caches
        timer.clear()
        computes.clear()
        t = time.perf_counter()
        runs = [generate() for _ in range(rounds)]
        wall = time.perf_counter() - t
        launched = _prelaunch_counts([p.address(timeout=30) for p in procs])
    finally:
        (stages.StageRuntime.run, stages.StageRuntime.submit, stages.StageRuntime.wait, chain.mx,
         chain._forward, chain.wire) = saved
        if router is not None:
            router.stop(grace=0)
        for p in procs:
            p.stop()
    calls = timer.calls[SPAN_ALL]
    if not calls:
        raise RuntimeError(f"the router ran no stage span in {mode} mode")
    n = calls / spans  # forward passes (batch steps), prompts' included
    us = {name: timer.spent[name] / n * 1e6 for name in (SPAN_ALL, SPAN_EVAL, SPAN_REQ, SPAN_RTT, SPAN_DECODE)}
    node_us = sum(computes) / n * 1e6
    return {
        **({} if prompt == PROMPT else {"ms_per_prompt": wall / rounds / streams * 1e3}),
        "streams": streams,
        **({"node_args": list(node_args)} if node_args else {}),
        **({} if chains else {"chains": False}),
        **({} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}),
        "decode_tps": statistics.median(tps for tps, _ in runs),  # in all, prompts' time included
        "ms_per_pass": wall / n * 1e3,
        "spans": spans,
        "span_eval_us": us[SPAN_EVAL],
        "span_request_us": us[SPAN_REQ],
        "span_round_trip_us": us[SPAN_RTT],
        "span_node_compute_us": node_us,  # as the nodes report it, summed over the spans
        "span_wire_us": us[SPAN_RTT] - node_us,  # both ways, framing, parsing, wake-ups, beyond the nodes
        "span_decode_us": us[SPAN_DECODE],
        "span_other_us": us[SPAN_ALL] - us[SPAN_EVAL] - us[SPAN_REQ] - us[SPAN_RTT] - us[SPAN_DECODE],
        "spans_us": us[SPAN_ALL],
        "outside_spans_us": (wall - timer.spent[SPAN_ALL]) / n * 1e6,  # embedding, head, sampling, batching
        "prelaunch_steps": launched,  # the nodes' steps set running ahead, warm-up included (CUDA)
    }


def node_prelaunch_counts(address: str) -> dict:
    """A node's stage steps set running ahead: answered, gave up, let go (``GetStats``)."""
    from expertmesh.serving import channel
    from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

    with channel(address) as ch:
        stats = pb_grpc.ExpertServiceStub(ch).GetStats(pb.GetStatsRequest(), timeout=30)
    return {key: getattr(stats, f"prelaunch_{key}") for key in ("answered", "gave_up", "let_go")}


def _prelaunch_counts(addresses: list[str]) -> dict:
    """``node_prelaunch_counts`` summed over the nodes."""
    counts = [node_prelaunch_counts(address) for address in addresses]
    return {key: sum(c[key] for c in counts) for key in ("answered", "gave_up", "let_go")}


def node_breakdown(model: Path, trials: int = 300, tokens: int = 1, share: int = 2) -> dict:
    """µs per request of a node holding 1/``share`` of every MoE layer's
    experts, its NodeCore in this process: a decode request as the dispatcher
    sends it (``tokens`` rows, the slots this node holds), phase by phase."""
    from expertmesh import wire
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.nodes import core
    from expertmesh.nodes.core import NodeCore
    from expertmesh.nodes.store import ExpertStore
    from expertmesh.worker import MLXWorker

    store = ExpertStore(Checkpoint(model))
    E, k, H = store.adapter.num_experts, store.adapter.top_k, store.adapter.hidden_size
    mine = list(range(E // share))
    store.assign({layer: mine for layer in store.adapter.moe_layers})
    worker = MLXWorker("node-breakdown")
    node = NodeCore("bench", store, 1 << 40, worker)
    rng = np.random.default_rng(0)
    frames = []
    for i in range(64):
        ids = np.stack([rng.permutation(E)[:k] for _ in range(tokens)]).astype(np.int32)
        ids = np.where(ids < len(mine), ids, -1)
        hidden = wire.from_float32(rng.standard_normal((tokens, H)).astype(np.float32), pb.BFLOAT16)
        req = pb.ForwardRequest(request_id=i + 1, expert=pb.ExpertRequest(
            layer=store.adapter.moe_layers[i % len(store.adapter.moe_layers)],
            hidden=wire.encode_numpy(hidden, pb.BFLOAT16), expert_ids=wire.encode_numpy(ids, pb.INT32),
            weights=wire.encode_numpy(np.where(ids >= 0, 1.0 / k, 0.0), pb.FLOAT32)))
        frames.append(req.SerializeToString())
    timer = _Timer()
    saved = core.wire, core.mx, store.forward_wire
    core.wire = _TimedModule(wire, timer, {"decode_numpy": "decode", "all_finite": "decode",
                                               "from_numpy": "decode", "decode": "decode",
                                               "encode": "encode", "encode_numpy": "encode",
                                               "to_numpy": "encode", "framed_tensor": "encode"})
    core.mx = _TimedModule(mx, timer, {"eval": "eval"})
    store.forward_wire = timer.wrap("graph", store.forward_wire)
    parse, serialize, total = [], [], []

    def one(frame: bytes) -> None:
        t0 = time.perf_counter()
        req = pb.ForwardRequest.FromString(frame)
        t1 = time.perf_counter()
        resp = node.forward(req)
        t2 = time.perf_counter()
        resp.SerializeToString()
        t3 = time.perf_counter()
        parse.append(t1 - t0)
        serialize.append(t3 - t2)
        total.append(t3 - t0)

    def run() -> None:
        for f in frames * 4:  # warm-up: every layer's compiled step traced
            one(f)
        timer.clear()
        parse.clear(), serialize.clear(), total.clear()
        for i in range(trials):
            one(frames[i % len(frames)])

    try:
        worker.run(run)
    finally:
        core.wire, core.mx, store.forward_wire = saved
        worker.close()
    n = len(total)
    out = {f"node_{name}_us": timer.spent[name] / n * 1e6 for name in ("decode", "graph", "eval", "encode")}
    out.update(node_parse_us=statistics.mean(parse) * 1e6, node_serialize_us=statistics.mean(serialize) * 1e6,
               node_request_us=statistics.median(total) * 1e6, node_request_mean_us=statistics.mean(total) * 1e6,
               node_tokens=tokens)
    out["node_other_us"] = out["node_request_mean_us"] - sum(
        out[f"node_{p}_us"] for p in ("parse", "serialize", "decode", "graph", "eval", "encode"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--scale", action="store_true", help="Qwen3-30B-A3B widths, 4-bit (run.py --scale)")
    parser.add_argument("--spans", action="store_true",
                        help="an auto-mode token instead, whose layers run as stage spans on the nodes")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile decode steps, in the nodes and the router here (default: on)")
    args = parser.parse_args()
    compiled.configure(args.compile)
    root = Path(tempfile.mkdtemp(prefix="expertmesh-breakdown-"))
    try:
        model = bench_model(root, args.layers, args.scale)
        if args.spans:
            r = stage_breakdown(model, args.nodes, args.tokens, args.rounds, root)
            print(f"auto mode: decode {r['decode_tps']:.1f} tok/s; {r['ms_per_pass']:.2f} ms per forward pass")
            for key, value in r.items():
                print(f"  {key:<28} {value:8.1f}")
            return
        r = router_breakdown(model, args.nodes, args.tokens, args.rounds, root, args.compile)
        r.update(node_breakdown(model))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"compile {'on' if args.compile else 'off'}: "
          f"decode {r['decode_tps']:.1f} tok/s; {r['ms_per_token']:.2f} ms per token, prefill included")
    for key, value in r.items():
        if key.endswith("_us"):
            print(f"  {key:<28} {value:8.0f} us")


if __name__ == "__main__":
    main()
