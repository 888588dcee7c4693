"""A checkpoint's identity tells apart two fine-tunes of one architecture
(config, every tensor's name/dtype/shape, sampled blocks of every tensor),
cheaply, and a node serving other weights under the same config is refused
in one line that says what differs."""

import json
import os
import shutil
import struct
import time

import grpc
import numpy as np
import pytest

from expertmesh.checkpoint import Checkpoint
from expertmesh.discovery import Announcement, NodeRecord
from expertmesh.errors import ConfigMismatchError
from expertmesh.router import Router, RouterConfig
from expertmesh.router.membership import Membership
from expertmesh.serving import PROTOCOL_VERSION
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import running_nodes

TUNED = "model.layers.1.self_attn.q_proj.weight"


def fine_tune(src, dst, name: str = TUNED):
    """A copy of ``src`` where tensor ``name`` (one layer's) has other values and the same shape."""
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        data = bytearray(shard.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8:8 + n]).get(name)
        if meta:
            a, b = (8 + n + o for o in meta["data_offsets"])
            values = np.frombuffer(bytes(data[a:b]), dtype="<f4") + np.float32(0.01)
            data[a:b] = values.astype("<f4").tobytes()
            shard.write_bytes(bytes(data))
            return dst
    raise AssertionError(f"{name} is in no shard")


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory):
    return fine_tune(tiny, tmp_path_factory.mktemp("tuned") / "mlx-f32")


def test_a_fine_tune_has_the_same_config_and_layout_but_other_values(tiny, tuned):
    ours, theirs = Checkpoint(tiny).identity, Checkpoint(tuned).identity
    assert ours.config == theirs.config and ours.weights != theirs.weights
    assert ours.weights.split(".")[0] == theirs.weights.split(".")[0]  # the same names, dtypes and shapes
    assert Checkpoint(shutil.copytree(tiny, tuned.parent / "copy")).identity == ours  # a copy is the same
    said = ours.difference(theirs.config, theirs.weights, "the router")
    assert "other weights under the same config" in said and "fine-tune" in said


def test_a_router_refuses_a_node_with_other_weights_in_one_line(tiny, tuned):
    with running_nodes(tuned, 1) as nodes:
        router = Router(RouterConfig(model=tiny, peers=[nodes[0].address], port=0, mode="expert"))
        try:
            with pytest.raises(ConfigMismatchError) as err:
                router.connect()
        finally:
            router.stop(grace=0)
    line = str(err.value)
    assert "\n" not in line and "n0" in line and "other weights under the same config" in line
    assert Checkpoint(tuned).identity.weights.split(".")[1] in line


def test_a_node_refuses_an_assign_for_other_weights_and_keeps_serving(tiny, tuned):
    router_side = Checkpoint(tiny).identity
    with running_nodes(tuned, 1) as nodes, grpc.insecure_channel(nodes[0].address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        wrong = pb.AssignRequest(config_hash=router_side.config, weights_hash=router_side.weights,
                                 experts=[pb.LayerExperts(layer=0, experts=[0, 1])])
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Assign(wrong, timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "other weights under the same config" in err.value.details()
        right = Checkpoint(tuned).identity
        wrong.weights_hash = right.weights
        list(stub.Assign(wrong, timeout=30))
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).weights_hash == right.weights


def test_an_mdns_record_of_other_weights_is_rejected_with_what_differs(tiny, tuned):
    ours, theirs = Checkpoint(tiny).identity, Checkpoint(tuned).identity
    membership = Membership(RouterConfig(model=tiny, discovery=False, peers=["127.0.0.1:9"]), "mlx-f32", ours)
    record = NodeRecord("mini", PROTOCOL_VERSION, "mlx-f32", theirs.config, 10**9, weights_hash=theirs.weights)
    said = membership.rejection(Announcement("mini", ("10.0.0.2",), 4000, record))
    assert said.startswith("serves model mlx-f32 with other weights under the same config")
    assert NodeRecord.from_txt({k.encode(): v.encode() for k, v in record.to_txt().items()}) == record
    same = NodeRecord("mini", PROTOCOL_VERSION, "mlx-f32", ours.config, 10**9, weights_hash=ours.weights)
    assert membership.rejection(Announcement("mini", ("10.0.0.2",), 4000, same)) == ""


def test_the_identity_of_a_64_gb_checkpoint_takes_well_under_a_second(tmp_path):
    """Sparse files: reading them whole would take many seconds even from the page cache."""
    model = tmp_path / "big"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    rows = 1 << 14
    for s in range(4):
        header = {f"t{s}.{i}": {"dtype": "F32", "shape": [rows, rows], "data_offsets": [i << 30, (i + 1) << 30]}
                  for i in range(16)}
        raw = json.dumps(header).encode()
        with open(model / f"model-{s}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + (16 << 30))
    assert sum(os.path.getsize(f) for f in model.glob("*.safetensors")) > 64 << 30
    tic = time.perf_counter()
    Checkpoint(model).identity
    assert time.perf_counter() - tic < 1.0
