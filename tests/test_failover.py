"""Nodes fail mid-generation (SIGKILL, SIGSTOP) and the generation goes on
with the tokens mlx-lm computes: on replicas after one retry of the layer, or
on experts re-planned onto the live nodes; without memory for that, the client
hears UNAVAILABLE naming the lost experts within the deadline."""

import signal
import time
from functools import cache

import pytest

from expertmesh import Client, UnavailableError
from expertmesh.nodes import Node, NodeConfig
from expertmesh.v1 import expertmesh_pb2 as pb

from conftest import node_processes, running_router
from test_correctness import PROMPT, reference_tokens

TOKENS = 16


@cache
def expected(model):
    return reference_tokens(model, PROMPT, TOKENS)


def generate(router, node=None, sig=None, after=4):
    """Stream a generation; send ``sig`` to ``node`` once ``after`` tokens came."""
    tokens = []
    with Client(f"127.0.0.1:{router.port}") as c:
        for piece in c.generate(PROMPT, max_tokens=TOKENS):
            tokens.append(piece.token)
            if node is not None and len(tokens) == after:
                node.proc.send_signal(sig)
    return tokens


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["sigkill", "sigstop"])
def test_a_node_that_dies_or_hangs_mid_generation_moves_to_replicas_with_one_retry(tiny, tmp_path, sig):
    expected(tiny)
    with node_processes(tiny, 3, tmp_path) as nodes, \
            running_router(tiny, [address for _, address in nodes], replicas=2, forward_timeout=1.0) as router:
        assert all(len(router.placement.holders(l, e)) == 2 for l in router.placement.owners for e in range(8))
        assert generate(router, nodes[1][0], sig) == expected(tiny)
        # SIGKILL: the broken stream may tell before a layer needs the node (no retry);
        # SIGSTOP: only the deadline tells, on the first layer that needs the node
        retries = router.dispatcher.retries
        assert retries == 1 if sig == signal.SIGSTOP else retries <= 1
        assert [n.state for n in router.cluster().nodes] == [pb.READY, pb.DOWN, pb.READY]
        assert generate(router) == expected(tiny)  # the next request runs on the two left, no retry
        assert router.dispatcher.retries == retries


def test_without_replicas_lost_experts_are_re_planned_onto_live_nodes(tiny, tmp_path, host_copies):
    with node_processes(tiny, 3, tmp_path) as nodes, running_router(tiny, [address for _, address in nodes]) as router:
        lost = router.placement.experts_of("n1")
        assert generate(router, nodes[1][0], signal.SIGKILL) == expected(tiny)
        assert router.dispatcher.retries <= 1
        held = [router.placement.experts_of(n) for n in ("n0", "n2")]
        for layer, experts in lost.items():
            assert set(experts) <= set(held[0][layer]) | set(held[1][layer])


def test_without_memory_for_the_lost_experts_the_client_hears_which_within_the_deadline(tiny, tmp_path):
    # 0.6 MB each: room for the 3 experts per layer each holds (0.59 MB), not for the lost ones
    with node_processes(tiny, 3, tmp_path, memory_gb=0.0006) as nodes, \
            running_router(tiny, [address for _, address in nodes], forward_timeout=1.0) as router, \
            Client(f"127.0.0.1:{router.port}") as c:
        lost = router.placement.experts_of("n1")
        assert lost == {l: [3, 4] for l in range(4)}
        stream = c.generate(PROMPT, max_tokens=TOKENS)
        next(stream)
        nodes[1][0].proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(UnavailableError, match=r"no live node holds layer 0 experts 3-4; layer 1 experts 3-4; "
                                                   r"layer 2 experts 3-4; layer 3 experts 3-4, and the live nodes "
                                                   r"lack the memory"):
            list(stream)
        assert time.monotonic() - stopped < 1.0 + 10  # the 1 s deadline, and a loaded machine's margin


def test_tokens_of_a_replicated_expert_are_spread_over_its_copies(tiny):
    # n1 has room for two experts and no primaries: copies of layer 0 experts 0 and 1
    nodes = [Node(NodeConfig(model=tiny, name=f"n{i}", memory_gb=gb)).start() for i, gb in enumerate((1, 0.0001))]
    try:
        with running_router(tiny, [n.address for n in nodes], replicas=2) as router:
            assert router.placement.experts_of("n1") == {0: [0, 1], 1: [], 2: [], 3: []}
            assert router.placement.replicas_of("n1") == 2
            assert generate(router) == expected(tiny)
            # n1 only gets what the spreading sends it
            assert nodes[1].core.stats.forward_tokens > 0
    finally:
        for n in nodes:
            n.stop(grace=0)
