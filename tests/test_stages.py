"""Pipeline stages: nodes run spans of whole layers and keep the KV; the
router plans expert / pipeline / auto and stays token-identical to mlx-lm."""


import grpc
import pytest
from mlx.utils import tree_flatten

from expertmesh import Client
from expertmesh.serving import channel
from expertmesh.testing.tinymodel import write_tiny_model
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import cli, in_threads, running_nodes, running_router
from test_correctness import PROMPT, reference_tokens

PROMPTS = ["a b", PROMPT, "The quick brown fox jumps over the lazy dog, again and again and again", "x"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-models")
    return {f: write_tiny_model(root / f, model_type=f, seed=1, layout="hf") for f in ("mixtral", "deepseek_v2")}


def tokens(client, prompt, n):
    return [p.token for p in client.generate(prompt, max_tokens=n)]


@pytest.mark.parametrize("variant,mode", [("mlx-4bit", "pipeline"), ("mixtral", "auto"), ("deepseek_v2", "pipeline")])
def test_stages_decode_the_tokens_mlx_lm_decodes(checkpoints, families, variant, mode):
    path = checkpoints.get(variant) or families[variant]
    expected = reference_tokens(path, n=24)
    with running_nodes(path, 2) as nodes, running_router(path, [n.address for n in nodes], mode=mode) as router:
        assert router.plan.mode == "pipeline"  # auto: two round trips per token beat one per layer
        assert sorted(router.plan.stages) == ["n0", "n1"]
        with Client(f"127.0.0.1:{router.port}") as client:
            assert tokens(client, PROMPT, 24) == expected
            info = [client_info(n) for n in nodes]
            assert [v.stages for v in client.cluster().nodes] == [[(s.start, s.end)] for i in info for s in i.stages]
        spans = [(s.start, s.end) for i in info for s in i.stages]  # sized by each node's measured speed
        assert len(spans) == 2 and spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == 4
        assert all(i.memory_used_bytes > 0 and not i.held for i in info)
        # the router keeps no weight of a layer a node runs
        names = [k for k, _ in tree_flatten(router.model.parameters())]
        assert not [k for k in names if ".layers." in k] and any("embed_tokens" in k for k in names)


def client_info(node) -> pb.NodeInfo:
    with channel(node.address) as ch:
        return pb_grpc.ExpertServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10)


@pytest.mark.parametrize("memory_gb,mode", [(1.0, "pipeline"), (0.00085, "mixed")])
def test_a_batch_joining_and_leaving_decodes_what_single_requests_do(tiny, memory_gb, mode):
    with running_nodes(tiny, 2, memory_gb) as nodes, \
            running_router(tiny, [n.address for n in nodes], mode="auto") as router:
        # mixed: one whole layer per node, the others' experts spread, their attention on the router
        assert router.plan.mode == mode
        with Client(f"127.0.0.1:{router.port}") as client:
            singles = [tokens(client, p, 12) for p in PROMPTS]
            long_one = client.generate(PROMPTS[1], max_tokens=40)
            first = next(iter(long_one))  # running: the others join its batch, with other prompt lengths
            with in_threads(lambda i: tokens(client, PROMPTS[i], 12), len(PROMPTS)) as runs:
                assert nodes[0].stages.wait_sequences(lambda s: len(s) >= 2, timeout=60)  # rows on the node at once
            rest = [first.token] + [p.token for p in long_one]
        assert [r.result() for r in runs] == singles
        assert rest[:12] == singles[1] and len(rest) == 40
        # every sequence finished: the router released its KV on both nodes
        for node in nodes:
            assert node.stages.wait_sequences(lambda s: not s, timeout=30)
            assert client_info(node).kv_sequences == 0 and client_info(node).kv_cache_bytes == 0


def test_a_cancelled_request_releases_its_kv(tiny):
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], mode="pipeline") as router:
        with Client(f"127.0.0.1:{router.port}") as client:
            stream = iter(client.generate(PROMPT, max_tokens=200))
            next(stream)
            assert all(n.stages.sequences for n in nodes)
            stream.close()  # the client goes away mid-generation
            assert all(n.stages.wait_sequences(lambda s: not s, timeout=30) for n in nodes)


@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_prompts_padded_and_chunked_together_match_mlx_lm_batching(tiny, prefill_chunk):
    """Prompts of different lengths, right-padded in one prefill and cut into
    4-token chunks (and those, through the router's chain, into pieces of 2),
    then decoded as one batch: what mlx-lm's own BatchGenerator computes on
    the whole model."""
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator

    ref_model, tok = load(str(tiny))
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)

    def run(model):
        gen = BatchGenerator(model, prefill_step_size=4, prefill_batch_size=8)
        uids = gen.insert(prompts, max_tokens=[10] * len(prompts))
        out = {u: [] for u in uids}
        while any(len(t) < 10 for t in out.values()):
            for r in gen.next()[1]:
                out[r.uid].append(r.token)
        return [out[u] for u in uids]

    expected = run(ref_model)
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], mode="pipeline",
                                                         prefill_chunk=prefill_chunk) as router:
        assert router.worker.run(run, router.model) == expected
        router.worker.run(router.engine.scheduler.on_step)
        assert all(n.stages.wait_sequences(lambda s: not s, timeout=30) for n in nodes)


def test_the_idle_timeout_frees_kv_the_router_never_released(tiny):
    from expertmesh.nodes import Node, NodeConfig

    nodes = [Node(NodeConfig(model=tiny, name=f"idle{i}", memory_gb=1.0, kv_idle_timeout=3.0)).start()
             for i in range(2)]
    try:
        with running_router(tiny, [n.address for n in nodes], mode="pipeline") as router:
            router.engine.scheduler.on_step = lambda: None  # the router forgets to release
            with Client(f"127.0.0.1:{router.port}") as client:
                stream = client.generate(PROMPT, max_tokens=4)
                next(iter(stream))
                assert nodes[0].stages.sequences  # held while decoding
                list(stream)
            for node in nodes:
                assert node.stages.wait_sequences(lambda s: not s, timeout=30)
                assert node.stages.kv_bytes == 0
    finally:
        for node in nodes:
            node.stop(grace=0)


def test_nodes_refuse_bad_stage_requests_and_keep_serving(tiny):
    with running_nodes(tiny, 1) as (node,), channel(node.address) as ch:
        stub = pb_grpc.ExpertServiceStub(ch)
        config_hash = stub.GetInfo(pb.GetInfoRequest(), timeout=10).config_hash
        with pytest.raises(grpc.RpcError) as e:
            list(stub.AssignStages(pb.AssignStagesRequest(config_hash=config_hash,
                                                          stages=[pb.LayerSpan(start=2, end=9)]), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "within the model's 4 layers" in e.value.details()
        list(stub.AssignStages(pb.AssignStagesRequest(config_hash=config_hash,
                                                      stages=[pb.LayerSpan(start=0, end=4)]), timeout=30))
        response = node.core.forward(pb.ForwardRequest(request_id=1, ping=pb.Ping()))
        assert response.request_id == 1 and not response.HasField("output")  # a ping: nothing run
        with pytest.raises(Exception, match="no stage span starting at layer 1"):
            node.core.forward(pb.ForwardRequest(request_id=2, stage=pb.StageRequest(layer=1, hidden=pb.Tensor(
                data=bytes(4 * 64), shape=[1, 1, 64], dtype=pb.FLOAT32))))
        from expertmesh.errors import RequestTooLargeError
        from expertmesh.nodes import span as stages  # where the spans keep their limit

        def step(sequence: int) -> pb.ForwardResponse:
            return node.core.forward(pb.ForwardRequest(request_id=3, stage=pb.StageRequest(layer=0, hidden=pb.Tensor(
                data=bytes(4 * 64), shape=[1, 1, 64], dtype=pb.FLOAT32), sequences=[sequence])))
        limit, stages.MAX_SEQUENCES = stages.MAX_SEQUENCES, 3
        try:  # a client that opens sequences without end is refused, not given memory
            for sequence in (1, 2, 3):
                assert step(sequence).HasField("output")
            with pytest.raises(RequestTooLargeError, match="already keep the KV of 3 sequences"):
                step(4)
            assert step(3).HasField("output")  # held ones go on
            node.core.forward(pb.ForwardRequest(request_id=4, release=pb.SequenceRelease(sequences=[1])))
            assert step(4).HasField("output")
        finally:
            stages.MAX_SEQUENCES = limit
        m = stub.Measure(pb.MeasureRequest(layer=0), timeout=60)
        assert m.layer_seconds_batch1 > 0 and m.layer_seconds_batch8 > 0 and m.layer_bytes > 0
        for context in (-5, 2**31 - 1):  # a negative KV, or one that would fill the node's memory
            with pytest.raises(grpc.RpcError) as bad:
                stub.Measure(pb.MeasureRequest(layer=0, context=context), timeout=60)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"context must be 0 to 4096 tokens, not {context}" in bad.value.details()
        assert [(s.start, s.end) for s in stub.GetInfo(pb.GetInfoRequest(), timeout=10).stages] == [(0, 4)]


def test_plan_shows_the_mode_per_layer_and_the_predicted_speed(tiny):
    auto = cli("plan", "--model", str(tiny), "--node", "a:0.01", "--node", "b:0.01")
    assert auto.returncode == 0, auto.stderr
    assert "layers 0-1: whole layers on a (pipeline stage)" in auto.stdout
    assert "layers 2-3: whole layers on b (pipeline stage)" in auto.stdout
    assert "mode pipeline: predicted decode" in auto.stdout and "(expert: " in auto.stdout
    forced = cli("plan", "--model", str(tiny), "--node", "a:0.01", "--node", "b:0.01", "--mode", "expert")
    assert "layers 0-3: experts spread across a, b" in forced.stdout and "whole layers" not in forced.stdout
    # only one layer fits each node: the rest keeps its experts spread (a mixed plan)
    mixed = cli("plan", "--model", str(tiny), "--node", "a:0.00085", "--node", "b:0.00085", "--mode", "pipeline",
                "--rtt-us", "100", "--layer-us", "500", "900")
    assert mixed.returncode == 0, mixed.stderr
    assert "mode mixed" in mixed.stdout and "layer 0: whole layers on a (pipeline stage)" in mixed.stdout
    assert "layers 2-3: experts spread across a, b" in mixed.stdout
    bad = cli("plan", "--model", str(tiny), "--node", "a:1", "--layer-us", "0")
    assert bad.returncode == 1 and "--layer-us" in bad.stderr and "Traceback" not in bad.stderr


def test_expert_placement_flags_on_an_all_stage_plan_are_refused_or_said(tiny, tmp_path, caplog):
    import logging

    from google.protobuf import json_format

    stats = pb.RouterStats(num_experts=8)
    for layer in range(4):
        stats.layers.add(layer=layer, expert_tokens=[i + 1 for i in range(8)])
    path = tmp_path / "stats.json"
    path.write_text(json_format.MessageToJson(stats))
    out = cli("router", "--model", str(tiny), "--port", "0", "--peer", "127.0.0.1:1", "--mode", "pipeline",
              "--replicas", "2")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("--replicas and --placement-stats only apply to experts spread across "
                                       "nodes (--mode expert or auto)")
    caplog.set_level(logging.WARNING, "expertmesh.router.router")
    with running_nodes(tiny, 2) as nodes, \
            running_router(tiny, [n.address for n in nodes], mode="auto", placement_stats=path) as router:
        assert not router.plan.placement.owners  # auto chose stages for every layer (the tiny model fits)
        assert "--replicas and --placement-stats do not apply" in caplog.text  # said, not a crash
        with Client(f"127.0.0.1:{router.port}") as client:
            assert [p.token for p in client.generate(PROMPT, max_tokens=8)] == reference_tokens(tiny, PROMPT, 8)


_FIRST_STEP = """
import sys
from pathlib import Path
import mlx.core as mx
from expertmesh.nodes.stages import StageStore
from expertmesh.nodes.store import ExpertStore
from expertmesh.checkpoint import Checkpoint
stages = StageStore(ExpertStore(Checkpoint(Path(sys.argv[1]))))
stages.assign([(0, int(sys.argv[2]))])
H = stages.adapter.hidden_size
for T in (3, 1, 1):  # a prefill, then decode steps: compiled
    stages.forward(0, mx.zeros((1, T, H)), [7], [])
stages.close()
"""


def test_a_spans_first_decode_step_compiles_the_same_kernels_however_many_layers_it_has(tiny, tmp_path):
    """A constant inside a compiled step is written into its fused kernel's
    source: a per-layer one made every layer a kernel of its own to compile
    (minutes before the first token of a 48-layer span on MLX's CUDA backend)."""
    import os
    import subprocess
    import sys

    kernels = {}
    for layers in (1, 4):
        cache = tmp_path / f"tmp{layers}"  # MLX keeps its compiled kernels under the temp directory
        cache.mkdir()
        out = subprocess.run([sys.executable, "-c", _FIRST_STEP, str(tiny), str(layers)], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "TMPDIR": str(cache)})
        assert out.returncode == 0, out.stderr[-2000:]
        kernels[layers] = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert kernels[1] and kernels[4] == kernels[1]


@pytest.mark.parametrize("code", [pb.FLOAT32, pb.BFLOAT16])
def test_decode_steps_built_ahead_answer_what_steps_built_at_the_request_do(tiny, code):
    """A span builds its rows' next decode step while it waits (``prebuild``).
    Whatever comes instead (other rows, a trim, a prompt, a request on
    another thread), every answer is the one a node that builds nothing
    ahead gives, bit for bit; steady decode steps, and those after another
    sequence's release, run as built ahead."""
    import numpy as np

    from expertmesh import wire
    from expertmesh.checkpoint import Checkpoint
    from expertmesh.nodes.span import _Span
    from expertmesh.nodes.stages import StageStore
    from expertmesh.nodes.store import ExpertStore
    from expertmesh.worker import MLXWorker

    stores = {p: StageStore(ExpertStore(Checkpoint(tiny)), prebuild_steps=p) for p in (True, False)}
    for s in stores.values():
        s.assign([(0, 2)])
    H = stores[True].adapter.hidden_size
    rng = np.random.default_rng(0)
    built = {True: 0, False: 0}  # graphs built while a request waited, per store
    layers, requesting = _Span._layers, [None]

    def counted(self, *args):
        if requesting[0] is not None:
            built[requesting[0]] += 1
        return layers(self, *args)

    def hidden(B, T):
        return wire.from_float32(rng.standard_normal((B, T, H)).astype(np.float32), code)

    # (how, rows, hidden, trim, built at the request with prebuild on)
    script = [("here", [1], hidden(1, 3), 0, 1)] + [("here", [1], hidden(1, 1), 0, 0) for _ in range(3)]
    script += [("here", [2], hidden(1, 2), 0, 1), ("here", [1, 2], hidden(2, 1), 0, 1)]
    script += [("here", [1, 2], hidden(2, 1), 0, 0) for _ in range(2)]
    script += [("here", [1], hidden(1, 1), 1, 1), ("here", [1], hidden(1, 1), 0, 0), ("release", [2], None, 0, 0)]
    script += [("here", [1], hidden(1, 1), 0, 0), ("thread", [1], hidden(1, 1), 0, 1)]
    script += [("here", [1], hidden(1, 1), 0, 0) for _ in range(2)]
    _Span._layers = counted
    try:
        for how, rows, x, trim, _ in script:
            answers = []
            for prebuild, s in stores.items():
                if how == "release":
                    s.release(rows)
                    continue
                requesting[0] = prebuild
                step = lambda: answers.append(s.forward(0, x, rows, [], trim, code))  # noqa: E731
                if how == "here":
                    step()
                else:  # a thread of its own (MLX streams are per thread)
                    other = MLXWorker("elsewhere")
                    try:
                        other.run(step)
                    finally:
                        other.close()
                requesting[0] = None
                s.prebuild(0)
            if answers:
                (a, ca, ra), (b, cb, rb) = answers
                assert (ca, a.dtype, a.shape, ra) == (cb, b.dtype, b.shape, rb), (how, rows)
                assert a.tobytes() == b.tobytes(), (how, rows, trim)
    finally:
        _Span._layers = layers
        for s in stores.values():
            s.close()
    requests = [expected for how, *_, expected in script if how != "release"]
    assert built == {False: len(requests), True: sum(requests)}
