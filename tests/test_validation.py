"""Bad input to every RPC gets INVALID_ARGUMENT (RESOURCE_EXHAUSTED for size)
with a clear message, and the server goes on serving; a node reads nothing
outside its model directory."""

import json
import os
import shutil
import socket
import struct
import threading
import time

import grpc
import numpy as np
import pytest

from expertmesh import Client, wire
from expertmesh.checkpoint import Checkpoint
from expertmesh.errors import InvalidRequestError, ModelError, UnavailableError
from expertmesh.nodes import Node, NodeConfig
from expertmesh.serving import MAX_MESSAGE_BYTES
from expertmesh.router.dataplane import recv_reply
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import running_nodes

H = 64
INVALID, TOO_LARGE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
CODES = {c.value[0]: c for c in grpc.StatusCode}


@pytest.fixture(scope="module")
def node(tiny):
    with running_nodes(tiny, 1) as nodes, grpc.insecure_channel(nodes[0].address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        cfg = stub.GetInfo(pb.GetInfoRequest(), timeout=10).config_hash
        list(stub.Assign(pb.AssignRequest(config_hash=cfg, experts=[pb.LayerExperts(layer=0, experts=[0, 1])]),
                         timeout=30))
        yield nodes[0], stub


def forward_request(hidden=None, ids=None, weights=None, code=pb.FLOAT32, rid=1) -> pb.ForwardRequest:
    hidden = np.ones((1, H), np.float32) if hidden is None else hidden
    ids = np.array([[0, 1]], np.int32) if ids is None else ids
    weights = np.full(ids.shape, 0.5, np.float32) if weights is None else weights
    return pb.ForwardRequest(request_id=rid, expert=pb.ExpertRequest(
        layer=0, hidden=wire.encode_numpy(wire.from_float32(hidden, code), code),
        expert_ids=wire.encode_numpy(ids, pb.INT32), weights=wire.encode_numpy(weights, pb.FLOAT32)))


def tensor_case(field, **changes):
    req = forward_request()
    for k, v in changes.items():
        if k == "shape":
            del getattr(req.expert, field).shape[:]
            getattr(req.expert, field).shape.extend(v)
        else:
            setattr(getattr(req.expert, field), k, v)
    return req


NAN_ROW = np.full((1, H), np.nan, np.float32)
BAD = {
    "nan hidden f32": (forward_request(hidden=NAN_ROW), "hidden contains NaN or inf"),
    "inf hidden f16": (forward_request(hidden=np.full((1, H), np.inf, np.float32), code=pb.FLOAT16), "NaN or inf"),
    "nan hidden bf16": (forward_request(hidden=NAN_ROW, code=pb.BFLOAT16), "NaN or inf"),
    "inf weight": (forward_request(weights=np.array([[np.inf, 0.5]], np.float32)), "weights contain NaN or inf"),
    "huge shape": (tensor_case("hidden", shape=[1 << 40, H]), "invalid shape"),
    "negative shape": (tensor_case("hidden", shape=[-1, H]), "invalid shape"),
    "product overflow": (tensor_case("hidden", shape=[1 << 30] * 4), "bytes for shape"),
    "3-d hidden": (tensor_case("hidden", shape=[1, 1, H]), "expected [T, 64]"),
    "scalar hidden": (tensor_case("hidden", shape=[], data=b"\0" * 4), "expected [T, 64]"),
    "short data": (tensor_case("weights", data=b"\0" * 3), "3 bytes for shape [1, 2]"),
    "unknown dtype": (tensor_case("expert_ids", dtype=99), "expert_ids must be INT32"),
    "empty request": (pb.ForwardRequest(request_id=1, expert=pb.ExpertRequest(layer=0)), "expert_ids must be INT32"),
    "no operation": (pb.ForwardRequest(request_id=1), "names no operation"),
    "stage without hidden": (pb.ForwardRequest(request_id=1, stage=pb.StageRequest()), "hidden must be"),
    "stage rows past the limit": (pb.ForwardRequest(request_id=1, stage=pb.StageRequest(
        sequences=range(1, 5000), hidden=forward_request().expert.hidden)), "at most 1024 rows"),
    "release past the limit": (pb.ForwardRequest(request_id=1, release=pb.SequenceRelease(
        sequences=range(70000))), "at most 65536 sequences"),
    "k beyond experts": (forward_request(ids=np.zeros((1, 9), np.int32)), "k=9 exceeds the 8 experts"),
    "negative layer": (pb.ForwardRequest(request_id=1, expert=pb.ExpertRequest(
        layer=-7, hidden=forward_request().expert.hidden, expert_ids=forward_request().expert.expert_ids,
        weights=forward_request().expert.weights)),
                       "layer -7 is not held"),
}


@pytest.fixture(params=["grpc", "data plane"])
def ask(request, node):
    """Send one ForwardRequest; (status, message) of the answer."""
    n, stub = node
    if request.param == "grpc":
        def via_grpc(req):
            try:
                list(stub.Forward(iter([req]), timeout=10))
            except grpc.RpcError as e:
                return e.code(), e.details()
            return grpc.StatusCode.OK, ""
        yield via_grpc
        return
    with socket.create_connection(("127.0.0.1", n.dataplane.port), timeout=10) as sock:
        def via_socket(req):
            wire.send_frame(sock, req)
            resp = recv_reply(sock, 1 << 20)
            assert resp.request_id == req.request_id
            return CODES[resp.error_code], resp.error
        yield via_socket  # one connection for every case: errors do not close it


@pytest.mark.parametrize("case", list(BAD))
def test_bad_forward_is_invalid_argument_on_both_transports(ask, case):
    req, message = BAD[case]
    code, details = ask(req)
    assert code == INVALID and message in details, details
    assert ask(forward_request(rid=2)) == (grpc.StatusCode.OK, "")  # still serving (on the same connection)


def test_oversized_grpc_message_is_resource_exhausted(node):
    n, stub = node
    big = forward_request()
    big.expert.hidden.data = b"\0" * (MAX_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Forward(iter([big]), timeout=30))
    assert err.value.code() == TOO_LARGE
    assert len(list(stub.Forward(iter([forward_request()]), timeout=10))) == 1


def test_data_plane_frame_too_large_for_the_node_is_refused_and_others_go_on(node):
    n, _ = node
    with socket.create_connection(("127.0.0.1", n.dataplane.port), timeout=10) as sock:
        sock.sendall(struct.pack("<I", 0xFFFFFFFF))
        resp = recv_reply(sock, 1 << 20)
    assert CODES[resp.error_code] == TOO_LARGE and "exceeds" in resp.error
    with socket.create_connection(("127.0.0.1", n.dataplane.port), timeout=10) as sock:
        sock.sendall(struct.pack("<I", 5) + b"\xff" * 5)  # not a ForwardRequest: framing broken
        resp = recv_reply(sock, 1 << 20)
    assert CODES[resp.error_code] == INVALID and "not a valid ForwardRequest" in resp.error


@pytest.mark.parametrize("experts, message", [
    ([pb.LayerExperts(layer=0, experts=[1]), pb.LayerExperts(layer=0, experts=[2])], "layer 0 is listed more than once"),
    ([pb.LayerExperts(layer=-1, experts=[1])], "layer -1 is not an MoE layer"),
    ([pb.LayerExperts(layer=0, experts=[-3])], "expert ids [-3] out of range [0, 8)"),
    ([pb.LayerExperts(layer=0, experts=[1, 1])], "duplicate expert ids"),
])
def test_bad_assign_is_invalid_argument_and_changes_nothing(node, experts, message):
    n, stub = node
    cfg = n.store.checkpoint.config_hash
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Assign(pb.AssignRequest(config_hash=cfg, experts=experts), timeout=10))
    assert err.value.code() == INVALID and message in err.value.details()
    assert n.store.held() == {0: [0, 1]}
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).state == pb.READY


# --- the router ---------------------------------------------------------------------
ROUTER_BAD = {
    "negative max_tokens": (dict(max_tokens=-5), INVALID, "max_tokens must be >= 1"),
    "nan temperature": (dict(temperature=float("nan")), INVALID, "temperature must be a finite number"),
    "inf temperature": (dict(temperature=float("inf")), INVALID, "temperature must be a finite number"),
    "top_p above 1": (dict(top_p=2.0), INVALID, "top_p must be in [0, 1]"),
    "negative seed": (dict(seed=-1), INVALID, "seed must be in"),
    "empty prompt": (dict(prompt=""), INVALID, "the prompt is empty"),
    "empty stop": (dict(stop=[""]), INVALID, "stop strings must not be empty"),
    "too many stops": (dict(stop=["x"] * 65), TOO_LARGE, "at most 64 stop strings"),
    "prompt too long": (dict(prompt="word " * 600), INVALID, "the model's context is 512"),
    "megabytes of prompt": (dict(prompt="w" * (8 << 20)), TOO_LARGE, "characters; more than the model's context"),
}


@pytest.mark.parametrize("case", list(ROUTER_BAD))
def test_bad_generate_is_refused_clearly_and_the_router_goes_on(live_router, case):
    fields, code, message = ROUTER_BAD[case]
    with grpc.insecure_channel(f"127.0.0.1:{live_router.port}") as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(**{"prompt": "Hello", "max_tokens": 2, **fields}), timeout=60))
        assert err.value.code() == code and message in err.value.details(), err.value.details()
        assert time.monotonic() - start < 20  # refused before any real work
        assert len(list(stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=2), timeout=60))) == 2


def test_bad_chat_is_invalid_argument(live_router):
    with grpc.insecure_channel(f"127.0.0.1:{live_router.port}") as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        for req, message in ((pb.ChatRequest(max_tokens=2), "messages must not be empty"),
                             (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x" * (8 << 20))]),
                              "characters; more than the model's context")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Chat(req, timeout=60))
            assert err.value.code() in (INVALID, TOO_LARGE) and message in err.value.details()


# --- path confinement ------------------------------------------------------------------
@pytest.fixture
def model_copy(tiny, tmp_path):
    """A sharded copy of the tiny checkpoint and a safetensors file outside it."""
    model = shutil.copytree(tiny, tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = sorted(model.glob("*.safetensors"))[0]
    shutil.copy(shard, outside / "stolen.safetensors")
    return model, outside


def rewrite_index(model, change):
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {k: change(v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


@pytest.mark.parametrize("attack", ["dotdot index", "absolute index", "symlinked shard", "symlinked config"])
def test_node_never_reads_outside_its_model_directory(model_copy, attack):
    model, outside = model_copy
    first = sorted(model.glob("*.safetensors"))[0].name
    if attack == "dotdot index":
        rewrite_index(model, lambda f: "../outside/stolen.safetensors" if f == first else f)
    elif attack == "absolute index":
        rewrite_index(model, lambda f: str(outside / "stolen.safetensors") if f == first else f)
    elif attack == "symlinked shard":
        (model / first).unlink()
        os.symlink(outside / "stolen.safetensors", model / first)
    else:
        shutil.move(model / "config.json", outside / "config.json")
        os.symlink(outside / "config.json", model / "config.json")
    with pytest.raises(ModelError, match="lies outside the model directory"):
        Node(NodeConfig(model=model, name="n"))


def test_malformed_safetensors_header_is_a_model_error(model_copy):
    model, _ = model_copy
    shard = sorted(model.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [-1, 4]
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    shard.write_bytes(data[:8] + raw + data[8 + n:])
    with pytest.raises(ModelError, match=f"tensor {name} has shape"):
        Checkpoint(model).tensors


# --- the SDK ----------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda c: c.generate(123), "prompt must be a string, not int"),
    (lambda c: c.generate("hi", max_tokenz=2), "unknown option 'max_tokenz'"),
    (lambda c: c.generate("hi", temperature=float("nan")), "temperature must be a finite number"),
    (lambda c: c.chat(["hello"]), "messages must be {'role': str, 'content': str} dicts"),
    (lambda c: c.chat([{"role": "user", "content": "x"}], chat_template_kwargs={"a": object()}),
     "chat_template_kwargs must be a dict of JSON values"),
])
def test_sdk_misuse_is_invalid_request_error_before_any_call(call, message):
    with Client("127.0.0.1:1", timeout=5) as c, pytest.raises(InvalidRequestError) as err:
        call(c)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_node_computing_longer_than_the_deadline_says_so_and_is_waited_for():
    """The deadline bounds a node's silence, not its work: a request that
    computes for 3 s is answered under a 1 s deadline, the node having said
    "working" in between (a silent, SIGSTOPped node still fails within the
    deadline: test_failover)."""
    from expertmesh.nodes.dataplane import DataPlane
    from expertmesh.serving import HEARTBEAT_S
    from expertmesh.router.dataplane import DataPlaneSocket
    from expertmesh.router.link import NodeLink

    def slow_request(rid: int, layer: int = 1) -> pb.ForwardRequest:
        return pb.ForwardRequest(request_id=rid, expert=pb.ExpertRequest(layer=layer))

    def slow(req):
        if req.expert.layer == 1:
            threading.Event().wait(3.0)  # a long computation (a big prefill, say)
        return pb.ForwardResponse(request_id=req.request_id, compute_seconds=3.0)

    plane = DataPlane(["127.0.0.1"], slow).start()
    link = NodeLink(f"127.0.0.1:{plane.port}", timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", plane.port), timeout=10) as raw:  # what goes over the wire
            wire.send_frame(raw, slow_request(5))
            frames = []
            while not frames or frames[-1].working:
                frames.append(wire.recv_frame(raw, pb.ForwardResponse, 1 << 20))
        assert len(frames) >= int(3.0 / HEARTBEAT_S) - 2 and all(f.request_id == 5 for f in frames)
        assert all(f.working for f in frames[:-1]) and not frames[-1].working and frames[-1].compute_seconds == 3.0
        link.data_plane = DataPlaneSocket(socket.create_connection(("127.0.0.1", plane.port), timeout=10), repr(link))
        reply = link.submit(slow_request(6)).result(timeout=1.5)
        assert reply.request_id == 6 and not reply.working and not link.down
        assert link.submit(slow_request(7, layer=0)).result(timeout=1.5).request_id == 7
        link.request_limit = 2.0  # --request-limit: "working" for longer is a hang
        with pytest.raises(UnavailableError, match=r"still working on a request after 2s \(--request-limit\)"):
            link.submit(slow_request(8)).result(timeout=1.5)
        assert link.down
    finally:
        link.close(graceful=False)
        plane.stop()
