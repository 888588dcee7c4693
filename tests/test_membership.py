"""The router keeps track of its nodes: nodes of one name stay apart, and a
``--peer`` that stops is down (its experts re-planned onto the live node),
then re-admitted when it answers again."""

import contextlib
import logging
import re
import threading

from expertmesh import Client
from expertmesh.nodes import Node, NodeConfig

from conftest import running_router
from test_correctness import PROMPT, reference_tokens


class _Match(logging.Handler):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.pattern.search(record.getMessage()):
            self.seen.set()


@contextlib.contextmanager
def logged(pattern: str):
    """An event set once the router (its membership, its state's owner) logs a line matching ``pattern``."""
    log = logging.getLogger("expertmesh.router")
    handler, level = _Match(pattern), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.seen
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def start_node(model, name, port=0) -> Node:
    return Node(NodeConfig(model=model, name=name, memory_gb=1, port=port)).start()


def test_nodes_of_one_name_stay_apart_and_generate_what_mlx_lm_does(tiny):
    nodes = [start_node(tiny, "twin") for _ in range(2)]
    try:
        with running_router(tiny, [n.address for n in nodes]) as router, Client(f"127.0.0.1:{router.port}") as c:
            assert [n.name for n in c.cluster().nodes] == [f"twin@{n.address}" for n in nodes]
            assert [p.token for p in c.generate(PROMPT, max_tokens=16)] == reference_tokens(tiny, PROMPT, 16)
    finally:
        for n in nodes:
            n.stop(grace=0)


def test_a_peer_that_stops_is_down_its_experts_move_and_it_comes_back_with_them(tiny):
    nodes = [start_node(tiny, "p0"), start_node(tiny, "p1")]
    try:
        with running_router(tiny, [n.address for n in nodes]) as router, Client(f"127.0.0.1:{router.port}") as c:
            held = c.cluster().nodes[1].experts
            with logged(r"node p1 is down") as down:
                nodes[1].stop(grace=0)
                assert down.wait(10)
            assert [n.state for n in c.cluster().nodes] == ["ready", "down"]
            with logged(r"re-planning layer 0 experts 4-7; .* onto p0") as moved:
                assert [p.token for p in c.generate(PROMPT, max_tokens=16)] == reference_tokens(tiny, PROMPT, 16)
                assert moved.is_set()
            assert all(e == list(range(8)) for e in c.cluster().nodes[0].experts.values())

            with logged(r"node p1 is back at") as back:
                nodes[1] = start_node(tiny, "p1", port=nodes[1].port)  # same address: found by retrying it
                assert back.wait(30)
            (_, p1) = c.cluster().nodes
            assert p1.state == "ready" and p1.experts == held and not p1.error
            assert [p.token for p in c.generate(PROMPT, max_tokens=16)] == reference_tokens(tiny, PROMPT, 16)
    finally:
        for n in nodes:
            n.stop(grace=0)


def test_a_failed_load_during_recovery_leaves_the_placement_as_it_was(tiny, monkeypatch):
    from expertmesh import UnavailableError
    from expertmesh.errors import ExpertmeshError

    from conftest import running_nodes

    expected = reference_tokens(tiny, PROMPT, 8)
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes]) as router:
        lost = router.placement.experts_of("n1")
        before = router.state.snapshot
        real_assign = nodes[0].store.assign
        monkeypatch.setattr(nodes[0].store, "assign", lambda *a, **kw: (_ for _ in ()).throw(
            ExpertmeshError("the disk is gone")))
        nodes[1].stop(grace=0)
        with Client(f"127.0.0.1:{router.port}") as c:
            try:
                list(c.generate(PROMPT, max_tokens=8))
                raise AssertionError("a generation without n1's experts cannot succeed")
            except UnavailableError as e:
                assert "n0 failed to load them" in str(e) and "the disk is gone" in str(e)
            # the router did not take n0 to hold what it failed to load: the snapshot before is in force
            assert router.state.snapshot is before
            assert router.placement is before.placement
            assert all(router.placement.holders(l, e) == [1] for l, es in lost.items() for e in es)
            monkeypatch.setattr(nodes[0].store, "assign", real_assign)
            assert [p.token for p in c.generate(PROMPT, max_tokens=8)] == expected  # a later load succeeds
        assert all(router.placement.holders(l, e) == [1, 0] for l, es in lost.items() for e in es)  # now loaded
        after = router.state.snapshot
        assert after.epoch > before.epoch
        assert all(set(es) <= set(after.node("n0").experts[l]) for l, es in lost.items())
