"""Consecutive pipeline stages as one chain: each span's reply goes on to the
next span's node as the wire carried it, and a prompt goes through them in
chunks, pipelined, so that every stage node computes at once; the output is
still mlx-lm's, and a node lost mid-prompt loses no token."""

import logging
import signal

import mlx.core as mx
import pytest

from expertmesh import Client
from expertmesh.builtin import model_dir
from expertmesh.nodes import Node, NodeConfig
from expertmesh.router import link as links
from expertmesh.router.chain import chunks

from conftest import node_processes, running_nodes, running_router
from test_builtin import PROMPTS, TOL, not_greedy, reference  # noqa: F401 (a fixture)
from test_correctness import PROMPT, reference_tokens

TOKENS = 24


@pytest.fixture
def traffic(monkeypatch):
    """The router's stage requests in order: ("send" | "read", node, first layer, tokens a row)."""
    log, sent = [], {}
    submit, result = links.NodeLink.submit, links._SocketReply.result

    def recorded_submit(self, request):
        message = getattr(request, "message", request)  # a wire.Framed, or the message itself
        if message.WhichOneof("op") == "stage":
            sent[message.request_id] = (self.name, message.stage.layer, message.stage.hidden.shape[1])
            log.append(("send", *sent[message.request_id]))
        return submit(self, request)

    def recorded_result(self, timeout):
        reply = result(self, timeout)
        if self.request_id in sent:
            log.append(("read", *sent.pop(self.request_id)))
        return reply

    monkeypatch.setattr(links.NodeLink, "submit", recorded_submit)
    monkeypatch.setattr(links._SocketReply, "result", recorded_result)
    return log


def most_at_once(log) -> int:
    """The most nodes that had a request in flight at the same time."""
    busy, most = set(), 0
    for event, node, *_ in log:
        (busy.add if event == "send" else busy.discard)(node)
        most = max(most, len(busy))
    return most


def most_on_one_node(log) -> int:
    """The most requests one node had in flight at the same time."""
    flying, most = {}, 0
    for event, node, *_ in log:
        flying[node] = flying.get(node, 0) + (1 if event == "send" else -1)
        most = max(most, flying[node])
    return most


def test_chunks_cover_the_prompt_evenly_within_the_size():
    assert chunks(10, 0) == [(0, 10)] and chunks(10, 10) == [(0, 10)]
    assert chunks(10, 4) == [(0, 3), (3, 6), (6, 10)]
    assert chunks(9, 4) == [(0, 3), (3, 6), (6, 9)]
    for T in range(1, 40):
        for size in range(1, 12):
            got = chunks(T, size)
            assert got[0][0] == 0 and got[-1][1] == T and all(a < b <= a + size for a, b in got)
            assert all(b == a2 for (_, b), (a2, _) in zip(got, got[1:])) and len(got) == -(-T // size)
            sizes = [b - a for a, b in got]
            assert max(sizes) - min(sizes) <= 1  # no small last chunk costing a step of its own


@pytest.mark.parametrize("chunk", [3, 0])
def test_a_prompt_through_three_stage_nodes_gives_mlx_lm_s_logits_and_tokens(reference, traffic, chunk,
                                                                             host_copies):
    """On the trained model (near-ties between logits, so a wrong token shows):
    chunks of 3 tokens pipelined through 3 nodes, against whole prompts."""
    model = model_dir()
    with running_nodes(model, 3) as nodes, \
            running_router(model, [n.address for n in nodes], mode="pipeline", prefill_chunk=chunk) as router:
        spans = sorted(s for spans in router.plan.stages.values() for s in spans)
        assert len(spans) == 3 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        ids = mx.array([reference[1].encode(PROMPTS[1])])

        def prompt_logits():  # the nodes keep this pass's KV, as a generation's prompt
            logits = router.model(ids, cache=router.model.make_cache())
            mx.eval(logits)
            return logits

        logits = router.worker.run(prompt_logits)
        assert mx.abs(logits - reference[0](ids)).max().item() < TOL
        router.worker.run(router.stage_runtime.sweep)  # that pass's caches are gone: their KV is released
        assert all(n.stages.wait_sequences(lambda s: not s, timeout=30) for n in nodes)
        prompt_traffic = list(traffic)
        with Client(f"127.0.0.1:{router.port}") as client:
            got = {p: [x.token for x in client.generate(p, max_tokens=TOKENS)] for p in PROMPTS[:3]}
    for prompt, tokens in got.items():
        assert len(tokens) == TOKENS and not_greedy(reference, prompt, tokens) == [], prompt
    per_node = {}
    for event, node, layer, n in prompt_traffic:
        if event == "send":
            per_node.setdefault(node, []).append(n)
    assert len(per_node) == 3
    if chunk:  # every node got the prompt in chunks of 3 at most, and all three computed at once
        assert all(sum(ns) == ids.shape[1] and max(ns) <= 3 and len(ns) == -(-ids.shape[1] // 3)
                   for ns in per_node.values()), per_node
        assert most_at_once(prompt_traffic) == 3
    else:  # whole prompts, one node after the other
        assert all(ns == [ids.shape[1]] for ns in per_node.values())
        assert most_at_once(prompt_traffic) == 1
    # decode steps: one token a row, each node in turn
    steps = [n for event, _, _, n in traffic[len(prompt_traffic):] if event == "send"]
    assert steps.count(1) >= 3 * (TOKENS - 1)


@pytest.mark.parametrize("far", ["127.0.0.2", "127.0.0.1"])
def test_by_default_a_long_prompt_goes_in_chunks_only_between_nodes_on_two_hosts(tiny, traffic, far):
    """Nodes of one host share its GPU, where chunks only add work; nodes of
    two hosts (here two loopback addresses) run them side by side."""
    prompt = " ".join([PROMPT] * 12)
    expected = reference_tokens(tiny, prompt, 8)
    nodes = [Node(NodeConfig(model=tiny, name=name, host=host, memory_gb=1.0)).start()
             for name, host in (("near", "127.0.0.1"), ("far", far))]
    try:
        with running_router(tiny, [n.address for n in nodes], mode="pipeline") as router, \
                Client(f"127.0.0.1:{router.port}") as client:
            assert [p.token for p in client.generate(prompt, max_tokens=8)] == expected
    finally:
        for node in nodes:
            node.stop(grace=0)
    pieces = [n for event, node, _, n in traffic if event == "send" and node == "far" and n > 1]  # the prompt's
    assert sum(pieces) > 128
    if far == "127.0.0.1":  # one host: the prompt in one piece, one node after the other
        assert len(pieces) == 1 and most_at_once(traffic) == 1
    else:
        assert len(pieces) == -(-sum(pieces) // 128) and max(pieces) <= 128 and most_at_once(traffic) == 2


def test_a_stage_node_killed_in_the_middle_of_a_chunked_prompt_loses_no_token(tiny, tmp_path, caplog, monkeypatch,
                                                                             traffic, host_copies):
    caplog.set_level(logging.WARNING, "expertmesh.router.stages")
    expected = reference_tokens(tiny, PROMPT, TOKENS)
    with node_processes(tiny, 3, tmp_path) as nodes, \
            running_router(tiny, [address for _, address in nodes], mode="pipeline", prefill_chunk=2) as router, \
            Client(f"127.0.0.1:{router.port}") as client:
        (victim,) = router.plan.stages["n1"]
        submit, chunks_sent = links.NodeLink.submit, []

        def submit_then_kill(self, request):  # n1 dies as its third chunk of the prompt goes out
            message = getattr(request, "message", request)
            if self.name == "n1" and message.WhichOneof("op") == "stage" and message.stage.hidden.shape[1] > 1:
                chunks_sent.append(message.stage.hidden.shape[1])
                if len(chunks_sent) == 3:
                    nodes[1][0].proc.send_signal(signal.SIGKILL)
                    nodes[1][0].proc.wait(timeout=30)
            return submit(self, request)

        monkeypatch.setattr(links.NodeLink, "submit", submit_then_kill)
        assert [p.token for p in client.generate(PROMPT, max_tokens=TOKENS)] == expected
        assert len(chunks_sent) == 3 and "rebuilding the KV of 1 sequences" in caplog.text
        after = {n.name: [(s.start, s.end) for s in n.stages] for n in router.cluster().nodes}
        assert after["n1"] == [] and tuple(victim) in after["n0"] + after["n2"]
        del traffic[:]
        assert [p.token for p in client.generate(PROMPT, max_tokens=TOKENS)] == expected  # on the two left
        # one of them runs two spans of the chain now: it is sent one request at a time (a second
        # large one sent before the first reply is read would block both sides), the other node beside it
        assert most_on_one_node(traffic) == 1 and most_at_once(traffic) == 2
