"""Routing statistics: what the router counts, `expertmesh stats` and its plot."""

import json
import logging

import numpy as np
import pytest

from expertmesh import Client
from expertmesh.cli import main
from expertmesh.router.stats import RoutingStats, balance_ratio

from conftest import running_nodes, running_router

TOKENS = 6


@pytest.fixture(scope="module")
def mesh(tiny):
    """Two nodes and a router that has generated TOKENS tokens for one request."""
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes]) as router:
        address = f"127.0.0.1:{router.port}"
        with Client(address) as client:
            pieces = list(client.generate("Hello there", max_tokens=TOKENS))
        assert len(pieces) == TOKENS
        yield address, router, pieces[-1].prompt_tokens


def test_record_layer_counts_experts_nodes_and_traffic():
    stats = RoutingStats([1, 3], num_experts=4, nodes=["a", "b"])
    ids = np.array([[0, 1], [1, 3], [1, 2]], np.int32)
    owner = np.array([0, 0, 1, 1])[ids]
    stats.record_layer(3, ids, owner, [(0, 100, 50, 0.002), (1, 80, 40, 0.2)])
    assert stats.expert_tokens.tolist() == [[0, 0, 0, 0], [1, 3, 1, 1]]
    assert stats.node_tokens.tolist() == [[0, 0], [4, 2]]
    assert stats.bytes_sent.tolist() == [100, 80] and stats.bytes_received.tolist() == [50, 40]
    assert stats.rtt[1].count == 1 and stats.rtt[1].sum == pytest.approx(0.2)
    assert balance_ratio(stats.node_tokens) == pytest.approx(3 / 4)  # mean 3, max 4; the idle layer left out
    stats.reset()
    assert stats.expert_tokens.sum() == 0 and stats.rtt[0].count == 0


def test_stats_add_up_after_a_generate(mesh, capsys):
    address, router, prompt_tokens = mesh
    assert main(["stats", "--router", address, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    layers, k = len(router.adapter.moe_layers), s["top_k"]
    assert (k, len(s["layers"]), len(s["nodes"])) == (2, layers, 2)
    # the prompt once, then each generated token goes back through the model (mlx-lm may
    # have computed the step after the last one already)
    assert prompt_tokens + TOKENS - 1 <= int(s["tokens_processed"]) <= prompt_tokens + TOKENS
    assert int(s["tokens_generated"]) == TOKENS and s["requests"] == {"generate": "1"}
    expert_total = sum(int(t) for l in s["layers"] for t in l["expert_tokens"])
    assert expert_total == int(s["tokens_processed"]) * k * layers
    assert sum(int(n["tokens"]) for n in s["nodes"]) == expert_total
    assert 0 < s["balance_ratio"] <= 1
    traffic = sum(int(n["bytes_sent"]) + int(n["bytes_received"]) for n in s["nodes"])
    assert s["bytes_per_token"] == pytest.approx(traffic / int(s["tokens_processed"]))
    for n in s["nodes"]:  # one request per layer per forward pass that routed it anything
        assert int(n["rtt_seconds"]["count"]) == int(n["requests"]) > 0


def test_table_shows_nodes_balance_and_hot_experts(mesh, capsys):
    address, router, _ = mesh
    assert main(["stats", "--router", address, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "n0" in out and "n1" in out and "RTT p50" in out
    assert "balance ratio 0." in out or "balance ratio 1.000" in out
    assert "bytes per token" in out
    hot = out.split("hot experts (layer:expert, share of the layer): ")[1].strip().split(", ")
    assert len(hot) == 3
    layer, expert = hot[0].split(" ")[0].split(":")
    assert int(layer) in router.adapter.moe_layers and 0 <= int(expert) < router.adapter.num_experts


def test_plot_writes_a_heatmap_png(mesh, tmp_path, capsys):
    from matplotlib.image import imread

    address, _, _ = mesh
    png = tmp_path / "stats.png"
    assert main(["stats", "--router", address, "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    image = imread(png)
    assert image.shape[:2] == (700, 1000)  # figsize 10x7 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # not blank


def test_reset_zeroes_the_counters(tiny, capsys):
    with running_nodes(tiny, 1) as nodes, running_router(tiny, [nodes[0].address]) as router:
        address = f"127.0.0.1:{router.port}"
        with Client(address) as client:
            list(client.generate("Hi", max_tokens=2))
            assert client.stats(reset=True).tokens_generated == 2
            after = client.stats()
        assert after.tokens_generated == 0 and after.tokens_processed == 0
        assert after.balance_ratio == 0 and sum(n.requests for n in after.nodes) == 0


def test_pipeline_stages_report_what_their_gates_routed(tiny):
    """In the default mode (auto: whole layers on the nodes) the nodes run the
    gates; `stats`, Prometheus and a node's GetStats still show the traffic."""
    import urllib.request

    from expertmesh.serving import channel
    from expertmesh.v1 import expertmesh_pb2 as pb
    from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

    from conftest import cli

    with running_nodes(tiny, 2) as nodes, \
            running_router(tiny, [n.address for n in nodes], mode="auto", metrics_port=0) as router:
        assert router.plan.mode == "pipeline" and not router.placement.owners
        address = f"127.0.0.1:{router.port}"
        with Client(address) as client:
            prompt_tokens = list(client.generate("Hello there", max_tokens=TOKENS))[-1].prompt_tokens
        out = cli("stats", "--router", address, "--json")
        assert out.returncode == 0, out.stderr
        s = json.loads(out.stdout)
        layers, k = len(router.adapter.moe_layers), s["top_k"]
        processed = int(s["tokens_processed"])
        assert k == 2 and prompt_tokens + TOKENS - 1 <= processed <= prompt_tokens + TOKENS
        expert_total = sum(int(t) for l in s["layers"] for t in l["expert_tokens"])
        assert expert_total == processed * k * layers
        assert sum(int(n["tokens"]) for n in s["nodes"]) == expert_total
        spans = {name: sum(b - a for a, b in spans) for name, spans in router.plan.stages.items()}
        for n in s["nodes"]:  # each node's load is its layers' token-slots; one request per forward pass
            assert int(n["tokens"]) == spans[n["name"]] * processed * k
            assert int(n["requests"]) == int(n["rtt_seconds"]["count"]) == int(s["round_trips"]) // 2 > 0
            assert int(n["bytes_sent"]) > 0 and int(n["bytes_received"]) > 0
        mean = expert_total / 2
        assert s["balance_ratio"] == pytest.approx(mean / max(int(n["tokens"]) for n in s["nodes"]))
        table = cli("stats", "--router", address).stdout
        assert f"{processed} tokens processed" in table and "RTT p50" in table and "<=0ms" not in table
        with urllib.request.urlopen(router.metrics.url, timeout=10) as r:
            metrics = r.read().decode()
        assert f"expertmesh_router_tokens_processed_total {processed}.0" in metrics
        for node in nodes:  # as grpcurl ... ExpertService/GetStats shows it
            with channel(node.address) as ch:
                stats = pb_grpc.ExpertServiceStub(ch).GetStats(pb.GetStatsRequest(), timeout=10)
            assert stats.forward_requests > 0 and stats.forward_tokens >= processed and stats.bytes_sent > 0


def test_stage_routing_outside_the_span_is_not_counted():
    from expertmesh.v1 import expertmesh_pb2 as pb

    stats = RoutingStats([0, 1, 2, 3], num_experts=4, nodes=["a", "b"], top_k=2)
    good = pb.StageRouting(slots=[2 * 4 + 1, 3 * 4 + 0], counts=[2, 2])  # layer 2 expert 1, layer 3 expert 0
    stats.record_stage("b", 2, 4, 1, good, 100, 90, 0.003)
    experts, _, tokens = stats.totals()
    assert experts[2].tolist() == [0, 2, 0, 0] and stats.node_tokens[:, 1].tolist() == [0, 0, 2, 2]
    assert tokens.tolist() == [0, 0, 1, 1] and stats.requests.tolist() == [0, 1]
    for bad in (pb.StageRouting(slots=[0], counts=[1]),            # layer 0 is not in the span
                pb.StageRouting(slots=[9], counts=[1, 2]),         # counts do not match
                pb.StageRouting(slots=[9], counts=[10 ** 6])):     # more slots than the tokens sent
        stats.record_stage("b", 2, 4, 1, bad, 100, 90, 0.003)
    stats.record_stage("b", 2, 4, 1, good, 100, 90, 0.003)  # counted beside the bad ones, in one fold
    m = pb.RouterStats()
    stats.fill(m)
    assert stats.expert_tokens.sum() == 8 and m.round_trips == 5 and m.nodes[1].requests == 5
    assert m.tokens_processed == 5 and m.balance_ratio == pytest.approx(0.5)  # one node has all of it
    assert stats.totals()[1].sum() == 0  # stage layers are no work for the rebalancer


def test_stage_round_trips_counted_in_batches_give_the_counts_of_one_at_a_time(caplog):
    from expertmesh.v1 import expertmesh_pb2 as pb

    rng = np.random.default_rng(1)
    moe, E = [1, 2, 4, 5], 8  # layers 0 and 3 dense
    one, many = (RoutingStats(moe, num_experts=E, nodes=["a", "b"]) for _ in range(2))
    one.FOLD_EVERY = 1
    bad = 0
    for i in range(600):  # more than FOLD_EVERY: the batch folds on its own as well as when read
        start, end = ((0, 3), (3, 6))[i % 2]
        node = ("a", "b", "gone")[i % 3]
        layers = rng.choice([l for l in moe if start <= l < end], 6)
        slots, counts = list(layers * E + rng.integers(0, E, 6)), list(rng.integers(1, 3, 6))
        if i % 7 == 0:  # a dense layer's or another span's slot, or lengths that disagree
            slots[0] = (0 if start == 3 else 3) * E + 1
            bad += 1
        elif i % 11 == 0:
            counts.append(1)
            bad += 1
        for stats in (one, many):
            stats.record_stage(node, start, end, 2, pb.StageRouting(slots=slots, counts=counts), 10, 20, 0.001)
    with caplog.at_level(logging.WARNING, logger="expertmesh.router.stats"):
        a, b = pb.RouterStats(), pb.RouterStats()
        one.fill(a)
        many.fill(b)
    assert a == b and a.round_trips == 600
    warned = [r for r in caplog.records if "not counted" in r.getMessage()]
    assert len(warned) == 2 * bad  # each bad round trip said once by each
    assert [t.tolist() for t in one.totals()] == [t.tolist() for t in many.totals()]
    assert one.layer_tokens.tolist() == [2 * 300] * 4
    assert many.expert_tokens.sum() > 0 and many.requests.sum() == 400  # "gone" is no node of the plan


def test_a_reset_keeps_which_layers_pipeline_stages_run():
    from expertmesh.v1 import expertmesh_pb2 as pb

    stats = RoutingStats([0, 1, 2], num_experts=4, nodes=["a"])
    stats.record_stage("a", 0, 2, 1, pb.StageRouting(slots=[1], counts=[1]), 10, 10, 0.001)
    stats.reset()  # before anything read the counts: the round trip was still waiting
    assert stats.staged.tolist() == [True, True, False] and stats.totals()[0].sum() == 0
