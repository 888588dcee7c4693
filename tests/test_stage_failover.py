"""A pipeline stage node that dies loses only KV: the router loads its span
onto a live node, rebuilds every active sequence's KV there by re-running its
prefix, and the streams go on with the tokens they would have had; without
room for the span the client hears which layers were lost."""

import logging
import signal
import threading
import time

import pytest

from expertmesh import Client, UnavailableError
from expertmesh.nodes import Node, NodeConfig
from expertmesh.router.stages import StageRuntime

from conftest import node_processes, running_nodes, running_router
from test_correctness import PROMPT, reference_tokens
from test_stages import PROMPTS

TOKENS = 80


def spans_of(router) -> dict[str, list[tuple[int, int]]]:
    return {n.name: [(s.start, s.end) for s in n.stages] for n in router.cluster().nodes}


def test_a_stage_node_killed_mid_generation_moves_its_span_and_both_streams_go_on(tiny, tmp_path, caplog,
                                                                                  monkeypatch):
    caplog.set_level(logging.WARNING, "expertmesh.router.stages")
    # rebuild in chunks of 4 tokens, as histories over 512 tokens are: the span
    # before the lost one must keep the prefix's KV from chunk to chunk
    monkeypatch.setattr(StageRuntime, "REBUILD_CHUNK", 4)
    expected = reference_tokens(tiny, PROMPT, TOKENS)
    with node_processes(tiny, 3, tmp_path) as nodes, \
            running_router(tiny, [address for _, address in nodes], mode="pipeline") as router, \
            Client(f"127.0.0.1:{router.port}") as client:
        before = spans_of(router)
        assert all(before[n] for n in ("n0", "n1", "n2")), before  # a span on every node
        other = [p.token for p in client.generate(PROMPTS[2], max_tokens=TOKENS)]  # alone, before any failure
        first = client.generate(PROMPT, max_tokens=TOKENS)
        got, joined = [next(first).token], threading.Event()
        second: list[int] = []

        def run_second():
            for p in client.generate(PROMPTS[2], max_tokens=TOKENS):
                second.append(p.token)
                joined.set()
        thread = threading.Thread(target=run_second)
        thread.start()
        assert joined.wait(timeout=60)  # both sequences have KV on every stage node
        nodes[1][0].proc.send_signal(signal.SIGKILL)
        got += [p.token for p in first]
        thread.join(timeout=120)
        assert got == expected
        assert second == other
        assert "rebuilding the KV of 2 sequences" in caplog.text  # both were mid-generation
        after = spans_of(router)
        assert after["n1"] == [] and sorted(s for n in ("n0", "n2") for s in after[n]) == \
            sorted(s for spans in before.values() for s in spans)
        assert [p.token for p in client.generate(PROMPT, max_tokens=TOKENS)] == expected  # on the two left


def test_without_room_for_the_lost_span_the_client_hears_which_layers_within_the_deadline(tiny, tmp_path):
    # 0.9 MB each: room for two of the 0.45 MB layers, none left for the other node's
    with node_processes(tiny, 2, tmp_path, memory_gb=0.0009) as nodes, \
            running_router(tiny, [address for _, address in nodes], mode="pipeline", forward_timeout=1.0) as router, \
            Client(f"127.0.0.1:{router.port}") as client:
        (lost,) = router.plan.stages["n1"]
        stream = client.generate(PROMPT, max_tokens=TOKENS)
        next(stream)
        nodes[1][0].proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(UnavailableError, match=rf"layers {lost[0]}-{lost[1] - 1} ran on node n1 .*which is down.*"
                                                   r"no live node has 0\.\d MB free to take them over"):
            list(stream)
        assert time.monotonic() - stopped < 1.0 + 10  # the 1 s deadline, and a loaded machine's margin


def test_re_planning_lost_experts_counts_the_memory_of_the_live_nodes_stages(tiny):
    # n0 and n1 run one 0.45 MB layer each and hold experts of layers 2-3 in the
    # 0.35 MB left; n2 (0.3 MB) holds only experts. n2's experts do not fit what
    # the stages leave free on n0 and n1, though its budget less its experts would.
    with running_nodes(tiny, 1) as warm, running_router(tiny, [warm[0].address], mode="pipeline"):
        pass  # MLX kernels compiled in this process: n0's measured layer time is not the cold one
    nodes = [Node(NodeConfig(model=tiny, name=f"n{i}", memory_gb=gb)).start()
             for i, gb in enumerate((0.0008, 0.0008, 0.0003))]
    try:
        with running_router(tiny, [n.address for n in nodes], mode="pipeline") as router, \
                Client(f"127.0.0.1:{router.port}") as client:
            assert router.plan.stages == {"n0": [(0, 1)], "n1": [(1, 2)]}
            lost = router.placement.experts_of("n2")
            assert lost[2] and lost[3]
            nodes[2].stop(grace=0)
            with pytest.raises(UnavailableError, match=r"no live node holds layer 2 experts .*and the live nodes "
                                                       r"lack the memory"):
                list(client.generate(PROMPT, max_tokens=4))
    finally:
        for n in nodes:
            n.stop(grace=0)


def test_a_stage_node_that_comes_back_runs_its_span_again_with_fresh_kv(tiny, tmp_path):
    """No room elsewhere: while it is stopped requests fail in one line; once
    it answers again it takes its own span back and generates as before."""
    from test_membership import logged

    expected = reference_tokens(tiny, PROMPT, 8)
    with node_processes(tiny, 2, tmp_path, memory_gb=0.0009) as nodes, \
            running_router(tiny, [a for _, a in nodes], mode="pipeline", forward_timeout=1.0) as router, \
            Client(f"127.0.0.1:{router.port}") as client:
        assert [p.token for p in client.generate(PROMPT, max_tokens=8)] == expected
        stream = client.generate(PROMPT, max_tokens=8)
        got = [next(stream).token]  # n1 holds this sequence's KV for its span
        with logged(r"node n1 is down") as down:
            nodes[1][0].proc.send_signal(signal.SIGSTOP)
            with pytest.raises(UnavailableError, match=r"layers \d+-\d+ ran on .*n1.* no live node has"):
                got += [p.token for p in stream]
            assert down.wait(30)
        with logged(r"node n1 is back at") as back:
            nodes[1][0].proc.send_signal(signal.SIGCONT)
            assert back.wait(60)
        for _ in range(2):  # the span moves back once, then stays
            assert [p.token for p in client.generate(PROMPT, max_tokens=8)] == expected
        assert spans_of(router)["n1"]
