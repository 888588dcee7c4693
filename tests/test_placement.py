"""Default placement: contiguous ranges proportional to memory, then replicas
where memory allows; lost experts re-planned onto live nodes."""

import numpy as np
import pytest

from expertmesh.errors import PlacementError
from expertmesh.placement import NodeBudget, contiguous, take_over
from expertmesh.ranges import compact, expand


def test_ranges_follow_memory_budgets():
    p = contiguous([NodeBudget("a", 3000), NodeBudget("b", 1000)], 8, {0: 10, 2: 10})
    assert p.experts_of("a") == {0: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3, 4, 5]}
    assert p.experts_of("b") == {0: [6, 7], 2: [6, 7]}


def test_every_expert_on_exactly_one_node():
    p = contiguous([NodeBudget(str(i), 1000 + 7 * i) for i in range(5)], 128, {l: 1 for l in range(3)})
    for owners in p.owners.values():
        assert owners.shape == (128, 1)
        assert set(np.unique(owners)) == set(range(5))
        assert np.all(np.diff(owners[:, 0]) >= 0)  # contiguous


def test_experts_that_do_not_fit_name_the_shortfall():
    with pytest.raises(PlacementError, match=r"need 0.00 GB|offer"):
        contiguous([NodeBudget("a", 10), NodeBudget("b", 10)], 8, {0: 10})
    with pytest.raises(PlacementError, match="no nodes"):
        contiguous([], 8, {0: 1})


def test_compact_ranges_round_trip():
    ids = [0, 1, 2, 5, 7, 8, 9]
    assert compact(ids) == "0-2,5,7-9"
    assert expand(compact(ids)) == ids


def test_replicas_put_each_expert_on_two_nodes_next_to_its_primary():
    p = contiguous([NodeBudget(n, 1000) for n in "abc"], 6, {0: 10, 1: 10}, replicas=2)
    assert not p.short
    for owners in p.owners.values():
        assert owners.tolist() == [[0, 1], [0, 1], [1, 2], [1, 2], [2, 0], [2, 0]]
    assert p.holders(1, 4) == [2, 0]
    assert p.experts_of("a") == {0: [0, 1, 4, 5], 1: [0, 1, 4, 5]}
    assert p.bytes_of("a", {0: 10, 1: 10}) == 80
    assert p.replicas_of("a") == 4


def test_per_expert_replicas_and_the_experts_memory_leaves_short():
    # room for the primaries (4 each) and three more experts on each node
    p = contiguous([NodeBudget("a", 70), NodeBudget("b", 70)], 8, {0: 10},
                   replicas={(0, 0): 2, (0, 1): 2, (0, 2): 2, (0, 3): 2, (0, 7): 2})
    assert [p.holders(0, e) for e in range(8)] == [[0, 1], [0, 1], [0, 1], [0], [1], [1], [1], [1, 0]]
    assert p.short == {0: [3]}
    p = contiguous([NodeBudget("a", 1000), NodeBudget("b", 1000)], 4, {0: 10}, replicas=3)
    assert p.owners[0].shape == (4, 2) and p.short == {0: [0, 1, 2, 3]}  # two nodes: two copies at most


def test_lost_experts_go_to_the_live_node_with_most_room_or_are_named():
    p = contiguous([NodeBudget(n, 100) for n in "abc"], 6, {0: 10, 1: 10})
    lost = p.missing(np.array([True, False, True]))
    assert lost == {0: [2, 3], 1: [2, 3]}
    moves = take_over(p, lost, {0: 35, 2: 60}, {0: 10, 1: 10})
    assert moves == {2: {0: [2, 3], 1: [2]}, 0: {1: [3]}}
    assert p.holders(0, 2) == [1, 2] and p.holders(1, 3) == [1, 0]
    assert not p.missing(np.array([True, False, True]))
    before = {l: o.copy() for l, o in p.owners.items()}
    with pytest.raises(PlacementError, match=r"no live node holds layer 0 experts 0-1; layer 1 expert 1, .*"
                                             r"\(0.00 MB needed, 0.00 MB free\)"):
        take_over(p, {0: [0, 1], 1: [1]}, {2: 15}, {0: 10, 1: 10})
    assert all((before[l] == o).all() for l, o in p.owners.items())
