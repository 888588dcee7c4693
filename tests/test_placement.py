"""Default placement: contiguous ranges proportional to memory, each expert once."""

import numpy as np
import pytest

from expertmesh.errors import PlacementError
from expertmesh.placement import NodeBudget, contiguous
from expertmesh.ranges import compact, expand


def test_ranges_follow_memory_budgets():
    p = contiguous([NodeBudget("a", 3000), NodeBudget("b", 1000)], 8, {0: 10, 2: 10})
    assert p.experts_of("a") == {0: [0, 1, 2, 3, 4, 5], 2: [0, 1, 2, 3, 4, 5]}
    assert p.experts_of("b") == {0: [6, 7], 2: [6, 7]}


def test_every_expert_on_exactly_one_node():
    p = contiguous([NodeBudget(str(i), 1000 + 7 * i) for i in range(5)], 128, {l: 1 for l in range(3)})
    for owners in p.owners.values():
        assert owners.shape == (128,)
        assert set(np.unique(owners)) == set(range(5))
        assert np.all(np.diff(owners) >= 0)  # contiguous


def test_experts_that_do_not_fit_name_the_shortfall():
    with pytest.raises(PlacementError, match=r"need 0.00 GB|offer"):
        contiguous([NodeBudget("a", 10), NodeBudget("b", 10)], 8, {0: 10})
    with pytest.raises(PlacementError, match="no nodes"):
        contiguous([], 8, {0: 1})


def test_compact_ranges_round_trip():
    ids = [0, 1, 2, 5, 7, 8, 9]
    assert compact(ids) == "0-2,5,7-9"
    assert expand(compact(ids)) == ids
