"""A node serves one router at a time: a second router is refused, naming the
first; a takeover is explicit, and the router that lost its nodes fails its
requests with a clear status instead of producing other tokens."""

from __future__ import annotations

import socket

import pytest

from expertmesh import Client, ExpertmeshError, OwnershipError, UnavailableError
from expertmesh.serving import channel
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from conftest import running_nodes, running_router

PROMPT = "Once upon a time"


def holder(node) -> pb.RouterIdentity:
    with channel(node.address) as ch:
        return pb_grpc.ExpertServiceStub(ch).GetInfo(pb.GetInfoRequest(), timeout=10).router


def generate(router, max_tokens=16) -> list[int]:
    with Client(f"127.0.0.1:{router.port}") as c:
        return [p.token for p in c.generate(PROMPT, max_tokens=max_tokens)]


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_a_second_router_is_refused_naming_the_first_which_goes_on_unchanged(tiny, mode):
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], mode=mode) as first:
        before = generate(first)
        assert holder(nodes[0]).id == first.identity.id
        with pytest.raises(OwnershipError) as refused:
            with running_router(tiny, [n.address for n in nodes], mode=mode):
                pass
        assert f"serves router {first.identity.id[:8]} at {first.identity.address}" in str(refused.value)
        assert "--takeover" in str(refused.value)
        assert generate(first) == before
        assert holder(nodes[1]).id == first.identity.id


def test_a_router_that_stops_releases_its_nodes_for_the_next(tiny):
    with running_nodes(tiny, 2) as nodes:
        with running_router(tiny, [n.address for n in nodes]) as first:
            expected = generate(first)
        assert holder(nodes[0]).id == ""
        with running_router(tiny, [n.address for n in nodes], mode="pipeline") as second:
            assert generate(second) == expected
            assert holder(nodes[0]).id == second.identity.id


@pytest.mark.parametrize("mode", ["expert", "pipeline"])
def test_after_a_takeover_the_first_router_fails_clearly_and_never_says_other_tokens(tiny, mode):
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], mode=mode) as first:
        expected = generate(first, 24)
        other_mode = "pipeline" if mode == "expert" else "expert"
        with running_router(tiny, [n.address for n in nodes], mode=other_mode, takeover=True) as second:
            assert holder(nodes[0]).id == second.identity.id
            assert generate(second, 24) == expected
            for _ in range(3):  # whatever it tries, it never computes with the taken nodes again
                try:
                    got = generate(first, 24)
                except (UnavailableError, ExpertmeshError) as e:
                    assert "taken over by router" in str(e), e
                else:
                    assert got == expected
            assert generate(second, 24) == expected  # the new holder is not disturbed


def test_a_router_whose_http_port_is_taken_touches_no_node(tiny):
    with running_nodes(tiny, 1) as nodes, socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(UnavailableError, match="HTTP"):
            with running_router(tiny, [nodes[0].address], http_port=taken.getsockname()[1]):
                pass
        assert holder(nodes[0]).id == "" and not nodes[0].store.held()
