"""Property-based fuzzing of a live node process: over 10,000 random
ForwardRequests, valid and broken, each get an answer (an output of the right
size, or INVALID_ARGUMENT / RESOURCE_EXHAUSTED with a message); the node stays
up, answers a valid request exactly as before, and its memory does not grow."""

import collections
import socket
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from expertmesh import wire
from expertmesh.router.dataplane import recv_reply
from expertmesh.testing.process import Process
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

H = 64
HELD = {0: [0, 1, 2], 1: [5]}
BATCH, EXAMPLES = 50, 202  # 10,100 requests over the data plane
WARMUP = 500
# A leak of 1 KB per request would add 10 MB over the run; allocator caches
# (mlx keeps freed buffers for reuse, Python its arenas) settle during the warm-up.
MAX_RSS_GROWTH_MB = 8
ANSWERS = {0: "ok", grpc.StatusCode.INVALID_ARGUMENT.value[0]: "invalid",
           grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]: "too large"}
FIELDS = ("hidden", "expert_ids", "weights")


def _tensor(draw) -> str:
    return draw(st.sampled_from(FIELDS))


def _set_shape(req, draw):
    t = getattr(req, _tensor(draw))
    del t.shape[:]
    t.shape.extend(draw(st.lists(st.integers(-5, 70) | st.integers(-(1 << 62), 1 << 62), max_size=4)))


def _cut(req, draw):
    t = getattr(req, _tensor(draw))
    t.data = t.data[:draw(st.integers(0, max(len(t.data) - 1, 0)))]


def _extend(req, draw):
    t = getattr(req, _tensor(draw))
    t.data += draw(st.binary(min_size=1, max_size=16))


def _dtype(req, draw):
    getattr(req, _tensor(draw)).dtype = draw(st.integers(0, 9))


def _clear(req, draw):
    req.ClearField(_tensor(draw))


def _layer(req, draw):
    req.layer = draw(st.integers(-(1 << 31), (1 << 31) - 1))


def _poison(req, draw):
    """NaN or inf somewhere in hidden or weights, in the tensor's own dtype."""
    t = getattr(req, draw(st.sampled_from(["hidden", "weights"])))
    size = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2}.get(t.dtype)
    if size and len(t.data) >= size:
        value = np.array([draw(st.sampled_from([np.nan, np.inf, -np.inf]))], np.float32)
        bits = wire.encode_numpy(wire.from_float32(value, t.dtype), t.dtype).data
        i = draw(st.integers(0, len(t.data) // size - 1)) * size
        t.data = t.data[:i] + bits + t.data[i + size:]


def _ids(req, draw):
    """Any int32 expert ids, of any [T', k'] shape."""
    ids = draw(hnp.arrays(np.int32, draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
                          elements=st.integers(-3, 9) | st.integers(-(1 << 31), (1 << 31) - 1)))
    req.expert_ids.CopyFrom(wire.encode_numpy(ids, pb.INT32))


def _weights(req, draw):
    """Any float32 weights, NaN and inf included, of the ids' shape."""
    shape = tuple(req.expert_ids.shape)
    if all(0 <= d < 8 for d in shape):
        req.weights.CopyFrom(wire.encode_numpy(draw(hnp.arrays(np.float32, shape, elements=st.floats(width=32))),
                                               pb.FLOAT32))


def _empty(req, draw):
    for name in FIELDS:
        t = getattr(req, name)
        if t.shape:
            t.shape[0], t.data = 0, b""


MUTATIONS = [_set_shape, _cut, _extend, _dtype, _clear, _layer, _poison, _ids, _weights, _empty]


@st.composite
def forward_requests(draw):
    """A valid request for the node's experts; one in two gets one to three mutations."""
    T, k = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    layer = draw(st.sampled_from(sorted(HELD)))
    code = draw(st.sampled_from([pb.FLOAT32, pb.FLOAT16, pb.BFLOAT16]))
    rng = np.random.default_rng(draw(st.integers(0, 1 << 32)))  # the values matter less than the structure
    hidden = rng.standard_normal((T, H)).astype(np.float32)
    ids = rng.choice(np.array(HELD[layer] + [-1], np.int32), (T, k))
    weights = rng.random((T, k), np.float32)
    req = pb.ForwardRequest(request_id=0, expert=pb.ExpertRequest(
        layer=layer, hidden=wire.encode_numpy(wire.from_float32(hidden, code), code),
        expert_ids=wire.encode_numpy(ids, pb.INT32), weights=wire.encode_numpy(weights, pb.FLOAT32)))
    if draw(st.booleans()):
        for mutate in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
            mutate(req.expert, draw)
        if draw(st.integers(0, 9)) == 0:  # no operation, or another one with these tensors
            op = draw(st.sampled_from(["none", "stage", "release"]))
            expert = pb.ExpertRequest()
            expert.CopyFrom(req.expert)
            req.ClearField("op")
            if op == "stage":
                req.stage.CopyFrom(pb.StageRequest(layer=expert.layer, hidden=expert.hidden))
            elif op == "release":
                req.release.sequences.extend(draw(st.lists(st.integers(0, (1 << 64) - 1), max_size=5)))
    return req


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def node(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "node.log"
    p = Process(["node", "--model", str(tiny), "--port", "0", "--name", "fuzzed", "--memory-gb", "1"], log)
    try:
        address = p.address(timeout=120)
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.ExpertServiceStub(ch)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            list(stub.Assign(pb.AssignRequest(config_hash=info.config_hash, experts=[
                pb.LayerExperts(layer=l, experts=e) for l, e in HELD.items()]), timeout=60))
            yield p, stub, info.data_port
    finally:
        p.stop()


class Fuzzer:
    """Sends batches over one data-plane socket; counts the kinds of answers."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.next_id = 1
        self.answers = collections.Counter()
        self.seconds = 0.0  # spent sending and waiting for answers

    def send(self, requests: list) -> None:
        start = time.monotonic()
        ids = []
        for req in requests:
            req.request_id, self.next_id = self.next_id, self.next_id + 1
            ids.append(req.request_id)
            wire.send_frame(self.sock, req)
        for req, rid in zip(requests, ids):
            resp = recv_reply(self.sock, 1 << 20)
            assert resp is not None, "the node closed the connection"
            assert resp.request_id == rid
            kind = ANSWERS.get(resp.error_code)
            assert kind is not None, f"{resp.error_code}: {resp.error}"  # never INTERNAL or UNKNOWN
            if kind == "ok":
                hidden = req.expert.hidden
                assert len(resp.output.data) == len(hidden.data) and resp.output.dtype == hidden.dtype
            else:
                assert resp.error.startswith(f"request {rid}: ") and len(resp.error) > len(f"request {rid}: ") + 5
            self.answers[kind] += 1
        self.seconds += time.monotonic() - start


def fuzz_grpc(stub, requests: list) -> None:
    """The same requests on one gRPC Forward stream: it answers until the first bad one, which ends it with
    INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""
    try:
        for _ in stub.Forward(iter(requests), timeout=30):
            pass
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), e.details()


def test_ten_thousand_random_requests_leave_the_node_serving_and_its_memory_flat(node):
    proc, stub, port = node
    pid = proc.proc.pid
    probe = pb.ForwardRequest(expert=pb.ExpertRequest(
        layer=0, hidden=wire.encode_numpy(np.linspace(-1, 1, 2 * H, dtype=np.float32).reshape(2, H), pb.FLOAT32),
        expert_ids=wire.encode_numpy(np.array([[0, 2], [1, -1]], np.int32), pb.INT32),
        weights=wire.encode_numpy(np.array([[0.3, 0.7], [1.0, 0.0]], np.float32), pb.FLOAT32)))
    (before,) = list(stub.Forward(iter([probe]), timeout=10))
    fuzzer = Fuzzer(port)
    batch = st.lists(forward_requests(), min_size=BATCH, max_size=BATCH)
    settings_ = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)

    @settings(max_examples=WARMUP // BATCH, **settings_)
    @given(batch)
    def warm_up(requests):
        fuzzer.send(requests)

    @settings(max_examples=EXAMPLES, **settings_)
    @given(batch, st.booleans())
    def run(requests, also_grpc):
        fuzzer.send(requests)
        if also_grpc:
            fuzz_grpc(stub, requests)

    warm_up()
    rss_warm = rss_mb(pid)
    fuzzer.answers.clear()
    fuzzer.seconds = 0.0
    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    rss_after = rss_mb(pid)
    total = sum(fuzzer.answers.values())
    print(f"\nfuzz: {total} requests in {seconds:.1f}s, {fuzzer.seconds:.1f}s of it on the data plane "
          f"({total / fuzzer.seconds:.0f}/s there) {dict(fuzzer.answers)}; node RSS {rss_warm:.1f} -> {rss_after:.1f} MB")
    assert total >= 10_000
    assert min(fuzzer.answers["ok"], fuzzer.answers["invalid"]) > total // 10  # both kinds well exercised
    assert proc.proc.poll() is None
    (after,) = list(stub.Forward(iter([probe]), timeout=10))
    assert after.output == before.output  # still computes exactly as before
    assert rss_after - rss_warm < MAX_RSS_GROWTH_MB
    assert "Traceback" not in proc.log.read_text()
