"""The data plane of a real node process costs it nothing that lasts: connect
and close, headers that claim 64 MB and then say nothing, headers past the
limit. Its memory and thread count are read from outside, in /proc."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from expertmesh import wire
from expertmesh.nodes.dataplane import MAX_SERVED
from expertmesh.serving import MAX_MESSAGE_BYTES, channel
from expertmesh.router.dataplane import recv_reply
from expertmesh.testing.process import Process
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

MB = 1 << 20


def status(pid: int) -> tuple[int, int]:
    """(resident bytes, threads) of a process, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"])


def steady_threads(pid: int, timeout: float = 10) -> int:
    """The thread count once it held still for half a second (heartbeats end within 0.1 s)."""
    deadline, seen, since = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        if (threads := status(pid)[1]) != seen:
            seen, since = threads, time.monotonic()
        elif time.monotonic() - since > 0.5:
            break
        time.sleep(0.05)
    return seen


TOKEN = "bounds-token"


@contextlib.contextmanager
def node_process(model, log, *args: str):
    """(pid, data port, gRPC address) of an ``expertmesh node`` process."""
    p = Process(["node", "--model", str(model), "--name", "n0", "--memory-gb", "1", "--no-discovery", *args], log)
    try:
        address = p.address(timeout=120)
        with channel(address) as ch:
            metadata = [("authorization", f"Bearer {TOKEN}")] if args else None
            info = pb_grpc.ExpertServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=30, metadata=metadata)
        yield p.proc.pid, info.data_port, address
    finally:
        p.stop()


@pytest.fixture(scope="module")
def node(tiny, tmp_path_factory):
    with node_process(tiny, tmp_path_factory.mktemp("dataplane") / "node.log") as n:
        yield n


def ping(port: int, request_id: int = 1) -> pb.ForwardResponse:
    """One empty stage request on a fresh connection: the node answers it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        wire.send_frame(s, pb.ForwardRequest(request_id=request_id, ping=pb.Ping()))
        return recv_reply(s, MB)


def test_connections_that_close_or_lie_about_their_size_leave_nothing_behind(node):
    pid, port, address = node
    assert ping(port).request_id == 1  # warm: the node has borrowed its first MLX thread
    rss0, threads0 = status(pid)[0], steady_threads(pid)

    counts = []
    for round_ in range(2):  # the second round finds the threads the first one parked
        start = time.monotonic()
        for i in range(1000):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        cycles_s = time.monotonic() - start
        assert ping(port, 2).request_id == 2
        counts.append(steady_threads(pid))
        rss1 = status(pid)[0]
        print(f"\n1000 connect/close in {cycles_s:.1f}s: RSS {rss0 / MB:.0f} -> {rss1 / MB:.0f} MB, "
              f"threads {threads0} -> {counts[-1]}")
        assert rss1 - rss0 < 16 * MB
    # an MLX thread per connection served at once, kept for the next: at most MAX_SERVED, however many come
    assert max(counts) <= threads0 + MAX_SERVED

    def liar(i: int) -> socket.socket:
        """A header that claims the largest frame, a few bytes of it, then silence."""
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(struct.pack("<I", MAX_MESSAGE_BYTES) + b"x" * 1000)
        return s

    def too_big(i: int) -> pb.ForwardResponse:
        """A header past the limit: refused in one frame, connection closed."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(struct.pack("<I", 0xFFFFFFFF))
            return recv_reply(s, MB)

    for round_ in range(2):
        with ThreadPoolExecutor(8) as pool:
            liars = list(pool.map(liar, range(100)))
            refusals = list(pool.map(too_big, range(100)))
        rss_open, threads_open = status(pid)
        assert ping(port, 3).request_id == 3  # served meanwhile
        for s in liars:
            s.close()
        assert all(r.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "exceeds" in r.error
                   for r in refusals)
        rss2, threads2 = status(pid)[0], steady_threads(pid)
        print(f"round {round_}: 100 headers claiming {MAX_MESSAGE_BYTES // MB} MB held open: RSS {rss_open / MB:.0f} MB, "
              f"{threads_open} threads; closed: RSS {rss2 / MB:.0f} MB, threads {threads2}; "
              f"100 headers past the limit refused")
        assert rss_open - rss0 < 32 * MB and rss2 - rss0 < 32 * MB  # not 100 x 64 MB
        assert threads_open <= threads0 + MAX_SERVED  # at most MAX_SERVED served at once, one thread each
        assert threads2 <= threads0 + MAX_SERVED  # MLX threads are kept for reuse, at most one per slot
    with channel(address) as ch:  # and the node answers its control plane as before
        assert pb_grpc.ExpertServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).data_port == port


def test_a_served_connection_costs_the_node_one_thread(node):
    """A connection is read, computed and answered on one MLX thread of its own;
    heartbeats and hello deadlines are one ticker's for the whole data plane."""
    pid, port, _ = node
    assert ping(port).request_id == 1
    threads0 = steady_threads(pid)
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
    try:
        for i, s in enumerate(conns):  # each one served: it has had a request answered
            wire.send_frame(s, pb.ForwardRequest(request_id=10 + i, ping=pb.Ping()))
            assert recv_reply(s, MB).request_id == 10 + i
        threads = steady_threads(pid)
    finally:
        for s in conns:
            s.close()
    assert threads <= threads0 + len(conns), (threads0, threads)


def test_before_its_hello_a_connection_gets_no_more_than_the_hello_bytes(tiny, tmp_path):
    """With a cluster token nothing is served before the hello, and a hello may be 4 KB."""
    with node_process(tiny, tmp_path / "node.log", "--token", TOKEN) as (pid, port, _):
        rss0, threads0 = status(pid)[0], steady_threads(pid)

        def oversized_hello(i: int) -> pb.ForwardResponse:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(struct.pack("<I", MAX_MESSAGE_BYTES) + b"x" * 1000)
                return recv_reply(s, MB)
        with ThreadPoolExecutor(8) as pool:
            refusals = list(pool.map(oversized_hello, range(100)))
        assert all(r.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0] for r in refusals)
        rss1, threads1 = status(pid)[0], steady_threads(pid)
        print(f"\n100 hellos claiming {MAX_MESSAGE_BYTES // MB} MB refused: RSS {rss0 / MB:.0f} -> {rss1 / MB:.0f} MB, "
              f"threads {threads0} -> {threads1}")
        assert rss1 - rss0 < 16 * MB and threads1 <= threads0  # short-lived hello threads only, no MLX worker
