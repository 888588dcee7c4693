"""A node answers good requests, rejects bad ones clearly, and keeps serving."""

import socket
import struct

import grpc
import mlx.core as mx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from expertmesh import wire
from expertmesh.router.dataplane import recv_reply
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import running_nodes

H = 64


@pytest.fixture(scope="module")
def node(tiny):
    with running_nodes(tiny, 1) as nodes:
        n = nodes[0]
        with grpc.insecure_channel(n.address) as ch:
            stub = pb_grpc.ExpertServiceStub(ch)
            cfg = stub.GetInfo(pb.GetInfoRequest(), timeout=5).config_hash
            list(stub.Assign(pb.AssignRequest(config_hash=cfg, experts=[
                pb.LayerExperts(layer=0, experts=[0, 1, 2]), pb.LayerExperts(layer=1, experts=[5])]), timeout=30))
            yield n, stub


def request(layer=0, T=2, ids=None, weights=None, hidden=None, rid=1):
    ids = np.array([[0, 2], [1, -1]], dtype=np.int32) if ids is None else ids
    weights = np.full(ids.shape, 0.5, dtype=np.float32) if weights is None else weights
    hidden = np.ones((T, H), dtype=np.float32) if hidden is None else hidden
    return pb.ForwardRequest(request_id=rid, expert=pb.ExpertRequest(
        layer=layer, hidden=wire.encode_numpy(hidden, pb.FLOAT32), expert_ids=wire.encode_numpy(ids, pb.INT32),
        weights=wire.encode_numpy(weights, pb.FLOAT32)))


def forward(stub, *requests):
    return list(stub.Forward(iter(requests), timeout=10))


def test_assign_loads_only_the_assigned_experts(node):
    n, stub = node
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert {le.layer: list(le.experts) for le in info.held} == {0: [0, 1, 2], 1: [5]}
    assert info.state == pb.READY
    assert 0 < info.memory_used_bytes == n.store.nbytes
    # 4 experts of 3 projections [64 x 64] float32 each
    assert info.memory_used_bytes == 4 * 3 * 64 * 64 * 4


def test_forward_returns_weighted_sum_over_held_slots_with_request_ids(node):
    n, stub = node
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, H)).astype(np.float32)
    weights = np.array([[0.25, 0.75], [0.6, 0.4]], dtype=np.float32)
    out = forward(stub, request(hidden=hidden, weights=weights, rid=7), request(hidden=hidden, weights=weights, rid=8))
    assert [o.request_id for o in out] == [7, 8]
    got = np.asarray(wire.decode(out[0].output))
    mlp = n.store.layers[0].mlp  # local index == global id for experts 0, 1, 2
    x = mx.array(hidden)

    def expert(e, t):
        return np.asarray(mlp(x[t:t + 1], mx.array([[e]]))[0, 0])

    want0 = 0.25 * expert(0, 0) + 0.75 * expert(2, 0)
    want1 = 0.6 * expert(1, 1)  # slot 1 of token 1 belongs to another node
    np.testing.assert_allclose(got, np.stack([want0, want1]), rtol=1e-5, atol=1e-6)


BAD = {
    "layer not held": (lambda: request(layer=3), "layer 3 is not held"),
    "layer out of range": (lambda: request(layer=99), "layer 99"),
    "expert not held": (lambda: request(ids=np.array([[3, -1], [0, 1]], np.int32)), "experts [3] are not held"),
    "expert id out of range": (lambda: request(ids=np.array([[300, -1], [0, 1]], np.int32)), "[-1, 8)"),
    "negative expert id": (lambda: request(ids=np.array([[-5, -1], [0, 1]], np.int32)), "[-1, 8)"),
    "wrong hidden width": (lambda: request(hidden=np.ones((2, 32), np.float32)), "expected [T, 64]"),
    "ids rows differ": (lambda: request(ids=np.zeros((3, 2), np.int32)), "must both be [2, k]"),
    "empty batch": (lambda: request(T=0, ids=np.zeros((0, 2), np.int32)), "empty batch"),
    "nan weight": (lambda: request(weights=np.array([[np.nan, 1], [1, 1]], np.float32)), "NaN or inf"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_forward_is_invalid_argument_and_node_keeps_serving(node, case):
    n, stub = node
    make, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert len(forward(stub, request())) == 1  # still serving


def test_wrong_byte_count_and_dtype_are_rejected(node):
    n, stub = node
    req = request()
    req.expert.hidden.data = req.expert.hidden.data[:-4]
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bytes for shape [2, 64]" in err.value.details()
    req = request()
    req.expert.weights.dtype = pb.INT32
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, req)
    assert "weights must be FLOAT32" in err.value.details()
    req = request()
    req.expert.hidden.dtype = 77
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_assign_from_another_checkpoint_is_refused(node):
    n, stub = node
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Assign(pb.AssignRequest(config_hash="0" * 16, experts=[pb.LayerExperts(layer=0, experts=[1])]), timeout=5))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not config 0000000000000000" in err.value.details()


def test_assign_over_budget_is_resource_exhausted(tiny):
    with running_nodes(tiny, 1, memory_gb=1e-6) as nodes, grpc.insecure_channel(nodes[0].address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        cfg = stub.GetInfo(pb.GetInfoRequest(), timeout=5).config_hash
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Assign(pb.AssignRequest(config_hash=cfg, experts=[pb.LayerExperts(layer=0, experts=list(range(8)))]), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection_are_served(node):
    n, _ = node
    with grpc.insecure_channel(n.address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="expertmesh.v1.ExpertService"), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        reply = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"expertmesh.v1.ExpertService", "grpc.health.v1.Health"} <= names


def data_plane(node):
    n, stub = node
    port = stub.GetInfo(pb.GetInfoRequest(), timeout=5).data_port
    assert port > 0
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_data_plane_answers_like_grpc_forward(node):
    n, stub = node
    with data_plane(node) as sock:
        wire.send_frame(sock, request(rid=41))
        resp = recv_reply(sock, 1 << 20)
    (expected,) = forward(stub, request(rid=41))
    assert resp.request_id == 41 and resp.error_code == 0
    assert resp.output.data == expected.output.data
    assert resp.compute_seconds > 0


def test_each_operation_is_answered_by_name_on_both_transports(node):
    """A frame names its operation: experts, a stage step, a release, a ping.
    Each is answered under its request id, on the data plane and on gRPC
    Forward alike; a stage step to a node holding no span is refused."""
    n, stub = node
    ops = [request(rid=1), pb.ForwardRequest(request_id=2, ping=pb.Ping()),
           pb.ForwardRequest(request_id=3, release=pb.SequenceRelease(sequences=[7, 8])), request(rid=4)]
    with data_plane(node) as sock:
        for op in ops:
            wire.send_frame(sock, op)
        replies = [recv_reply(sock, 1 << 20) for _ in ops]
    assert [r.request_id for r in replies] == [1, 2, 3, 4] and not any(r.error_code for r in replies)
    assert replies[0].output.data == replies[3].output.data and not replies[1].HasField("output")
    assert [r.request_id for r in forward(stub, *ops)] == [1, 2, 3, 4]
    step = pb.ForwardRequest(request_id=5, stage=pb.StageRequest(layer=0, hidden=wire.encode_numpy(
        np.ones((1, 1, H), np.float32), pb.FLOAT32)))
    with data_plane(node) as sock:
        wire.send_frame(sock, step)
        refused = recv_reply(sock, 1 << 20)
    assert refused.request_id == 5 and "no stage span starting at layer 0" in refused.error


def test_data_plane_reports_bad_requests_and_keeps_the_connection(node):
    with data_plane(node) as sock:
        wire.send_frame(sock, request(layer=3, rid=5))
        bad = recv_reply(sock, 1 << 20)
        assert bad.request_id == 5
        assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "layer 3 is not held" in bad.error
        wire.send_frame(sock, request(rid=6))
        assert recv_reply(sock, 1 << 20).error_code == 0


def test_data_plane_refuses_oversized_frames_and_keeps_serving(node):
    with data_plane(node) as sock:
        sock.sendall(struct.pack("<I", (64 << 20) + 1))
        resp = recv_reply(sock, 1 << 20)
        assert resp.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert recv_reply(sock, 1 << 20) is None  # that stream is closed
    with data_plane(node) as sock:  # others are served
        wire.send_frame(sock, request(rid=9))
        assert recv_reply(sock, 1 << 20).request_id == 9
