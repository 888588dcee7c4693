"""One MoE-layer round trip through the real data path vs. a raw-TCP floor.

hop: Dispatcher -> node Forward -> back, 1 token, hidden 2048 bfloat16, k=8,
experts trivially small. floor: a Python socket ping-pong of the same bytes
on loopback, server in another process.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import struct
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from expertmesh.wire import recv_exact  # the data plane's own reader, so both sides match

H, K, E = 2048, 8, 16


def _pingpong_server(port_queue, reply_bytes: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_queue.put(srv.getsockname()[1])
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reply = b"\0" * reply_bytes
    while True:
        head = recv_exact(conn, 4)
        if not head:
            return
        (n,) = struct.unpack("<I", head)
        recv_exact(conn, n)
        conn.sendall(struct.pack("<I", len(reply)) + reply)


def tcp_floor_us(request_bytes: int, reply_bytes: int, trials: int) -> float:
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=_pingpong_server, args=(q, reply_bytes), daemon=True)
    proc.start()
    conn = socket.create_connection(("127.0.0.1", q.get(timeout=30)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = struct.pack("<I", request_bytes) + b"\1" * request_bytes
    times = []
    for _ in range(trials):
        t = time.perf_counter()
        conn.sendall(payload)
        (n,) = struct.unpack("<I", recv_exact(conn, 4))
        recv_exact(conn, n)
        times.append(time.perf_counter() - t)
    conn.close()
    proc.join(timeout=5)
    proc.kill()
    return statistics.median(times) * 1e6


def hop_model(root: Path) -> Path:
    from expertmesh.testing.tinymodel import write_tiny_model

    return write_tiny_model(root / "hop-model", seed=0, num_shards=1, config_overrides=dict(
        hidden_size=H, num_hidden_layers=1, num_experts=E, num_experts_per_tok=K,
        moe_intermediate_size=8, intermediate_size=64))


def hop_us(model: Path, trials: int) -> tuple[float, float, int, int]:
    """Median µs of one Dispatcher call to a node in its own process, and the
    median of each call less the compute time its reply reports; request and
    reply bytes."""
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.testing.process import Process
    from expertmesh.models import get_adapter
    from expertmesh.placement import NodeBudget, contiguous
    from expertmesh.router.dispatcher import Dispatcher
    from expertmesh.router.snapshot import Snapshot
    from expertmesh.router.link import NodeLink
    from expertmesh.v1 import expertmesh_pb2 as pb
    from expertmesh.worker import MLXWorker

    node = Process(["node", "--model", str(model), "--name", "hop", "--memory-gb", "1", "--no-discovery"],
                   model / "node.log")
    worker = MLXWorker("bench")
    link = None
    try:
        link = NodeLink(node.address(timeout=120), 10)
        link.get_info()
        ck = Checkpoint(model)
        adapter = get_adapter(ck.config)
        placement = contiguous([NodeBudget("hop", 10**9)], E, {0: adapter.expert_bytes(ck.tensors, 0)})
        link.assign(ck.identity, placement.experts_of("hop"), 60)
        link.open_stream()
        if link.data_plane is None:
            raise RuntimeError("the hop node offers no data plane: the hop would be gRPC's")
        snapshot = Snapshot.of(placement, [link])
        dispatch = Dispatcher(lambda: snapshot, 10)

        computes: list[float] = []  # the node's own compute time, from each reply
        receive = link.receive

        def receive_noting_compute(*args, **kwargs):
            reply = receive(*args, **kwargs)
            computes.append(reply.compute_seconds)
            return reply

        link.receive = receive_noting_compute

        def run():
            x = mx.random.normal((1, 1, H)).astype(mx.bfloat16)
            inds = mx.array(np.random.default_rng(0).permutation(E)[:K].reshape(1, 1, K).astype(np.int32))
            scores = mx.full((1, 1, K), 1.0 / K)
            mx.eval(x, inds, scores)
            for _ in range(20):  # warm-up: the node compiles its expert step on the first
                dispatch(0, x, inds, scores)
            totals, hops = [], []
            for _ in range(trials):
                computes.clear()
                t = time.perf_counter()
                dispatch(0, x, inds, scores)  # its result joins the next layer's graph
                totals.append(time.perf_counter() - t)
                hops.append(totals[-1] - sum(computes))
            return statistics.median(totals) * 1e6, statistics.median(hops) * 1e6

        total_us, hop_only_us = worker.run(run)
        stats = link.stub.GetStats(pb.GetStatsRequest(), timeout=10)
        n = stats.forward_requests
        return total_us, hop_only_us, stats.bytes_received // n, stats.bytes_sent // n
    finally:
        worker.close()
        if link is not None:
            link.close()
        node.stop()


def measure(model: Path, trials: int) -> dict:
    """hop and floor, measured in alternating rounds so both see the same machine."""
    totals, hops, floors = [], [], []
    for _ in range(3):
        t, h, req, rep = hop_us(model, trials // 3)
        totals.append(t)
        hops.append(h)
        floors.append(tcp_floor_us(req, rep, trials // 3))
    total, hop, floor = (statistics.median(v) for v in (totals, hops, floors))
    return {"hop_total_us": total, "node_compute_us": total - hop, "hop_us": hop,
            "tcp_floor_us": floor, "hop_ratio": hop / floor, "request_bytes": req, "reply_bytes": rep}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        print(measure(hop_model(Path(d)), 1500))
