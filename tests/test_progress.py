"""Progress of long work: the node streams Assign progress while it loads,
and the CLI draws it as bars on a terminal, as log lines elsewhere."""

import io
import logging
import threading

import grpc

from expertmesh.progress import Progress
from expertmesh.serving import channel
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import running_nodes


def test_assign_streams_progress_while_the_node_loads(tiny, monkeypatch):
    with running_nodes(tiny, 1) as (node,), channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        layers = [0, 1, 2, 3]
        request = pb.AssignRequest(config_hash=node.store.checkpoint.config_hash,
                                   experts=[pb.LayerExperts(layer=l, experts=[0, 1, 2]) for l in layers])
        hold, load_layer = threading.Event(), node.store._load_layer

        def slow_load(layer, experts):  # layer 2 waits until the test has seen layer 1's progress
            if layer == 2:
                hold.wait(60)
            return load_layer(layer, experts)

        monkeypatch.setattr(node.store, "_load_layer", slow_load)
        updates = stub.Assign(request, timeout=60)
        try:  # a node that replied only once loaded would time out here
            first, one, two = next(updates), next(updates), next(updates)
            assert node.core.state == pb.LOADING
        finally:
            hold.set()
        rest = list(updates)
        assert (first.loaded_bytes, first.layers_done, first.layers_total) == (0, 0, len(layers))
        assert [u.layers_done for u in [one, two] + rest] == [1, 2, 3, 4, 4] and rest[-1].done
        assert 0 < one.loaded_bytes < two.loaded_bytes < rest[0].loaded_bytes < rest[1].loaded_bytes
        assert rest[1].loaded_bytes == first.total_bytes == rest[-1].total_bytes
        assert node.core.state == pb.READY


def test_a_failed_assign_is_a_status_and_the_node_keeps_serving(tiny):
    with running_nodes(tiny, 1, memory_gb=1e-9) as (node,), channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        request = pb.AssignRequest(config_hash=node.store.checkpoint.config_hash,
                                   experts=[pb.LayerExperts(layer=0, experts=[0])])
        try:
            list(stub.Assign(request, timeout=30))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        else:
            raise AssertionError("an assignment over budget was accepted")
        assert stub.GetInfo(pb.GetInfoRequest(), timeout=10).state == pb.IDLE


def test_bars_draw_each_task_to_the_end():
    out = io.StringIO()
    with Progress("loading", bars=True, stream=out) as progress:
        for done in (0, 500_000, 1_000_000):
            progress.update("n0", done, 1_000_000)
        progress.update("n1", 0, 2_000_000)  # never finishes: closed with the rest
    text = out.getvalue()
    assert "loading n0" in text and "100%" in text and "1.00M/1.00M " in text
    assert "loading n1" in text and "0.00/2.00M " in text


def test_without_a_terminal_progress_is_two_log_lines_per_task(caplog):
    out = io.StringIO()  # not a TTY
    with caplog.at_level(logging.INFO, logger="expertmesh.progress"), Progress("loading", stream=out) as progress:
        for done in (0, 1_000_000, 3_000_000, 3_000_000):
            progress.update("n0", done, 3_000_000)
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["loading n0: 3.0 MB", "loading n0: done (3.0 MB)"]


def test_assign_stages_streams_progress_per_layer(tiny, monkeypatch):
    with running_nodes(tiny, 1) as (node,), channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        request = pb.AssignStagesRequest(config_hash=node.store.checkpoint.config_hash,
                                         stages=[pb.LayerSpan(start=0, end=2), pb.LayerSpan(start=2, end=4)])
        hold, read_proj = threading.Event(), node.store._read_proj

        def slow_read(layer, proj, experts):  # layer 2 waits until the test has seen layer 1's progress
            if layer == 2:
                hold.wait(60)
            return read_proj(layer, proj, experts)

        monkeypatch.setattr(node.store, "_read_proj", slow_read)
        updates = stub.AssignStages(request, timeout=60)
        try:  # a node that replied only once loaded would time out here
            first, one, two = next(updates), next(updates), next(updates)
        finally:
            hold.set()
        rest = list(updates)
        assert (first.loaded_bytes, first.layers_done, first.layers_total) == (0, 0, 4)
        assert [u.layers_done for u in [one, two] + rest] == [1, 2, 3, 4, 4] and rest[-1].done
        assert 0 < one.loaded_bytes < two.loaded_bytes < rest[0].loaded_bytes < rest[1].loaded_bytes
        assert rest[1].loaded_bytes == first.total_bytes > 0 and rest[-1].total_bytes > 0
