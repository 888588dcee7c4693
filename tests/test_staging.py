"""Staged input arrays: each put is what the next kernel reads, and what was
computed from an earlier put keeps its value."""

import mlx.core as mx
import numpy as np

from expertmesh.staging import Staging


def test_each_put_is_what_a_kernel_reads_and_earlier_results_keep_their_values():
    staging = Staging()
    first = staging.put(0, np.arange(8, dtype=np.float32))
    doubled = first * 2
    mx.eval(doubled)
    second = staging.put(0, np.full(8, 5, np.float32))
    assert second is first  # the same array, written again
    assert (second + 0).tolist() == [5.0] * 8
    assert doubled.tolist() == [2.0 * i for i in range(8)]


def test_keys_shapes_and_dtypes_each_have_their_own_array():
    staging = Staging(max_arrays=3)
    a = staging.put("a", np.zeros(4, np.int32))
    b = staging.put("b", np.ones(4, np.int32))
    c = staging.put("a", np.ones(2, np.int32))
    assert len({id(a), id(b), id(c)}) == 3
    assert a.tolist() == [0] * 4 and b.tolist() == [1] * 4 and c.tolist() == [1] * 2
    d = staging.put("a", np.full(4, 7, np.uint16))  # a fourth: the kept ones are let go, values intact
    assert d.dtype == mx.uint16 and d.tolist() == [7] * 4 and a.tolist() == [0] * 4


def test_dtypes_it_does_not_carry_come_back_as_plain_arrays():
    values = np.array([True, False])
    assert Staging().put(0, values).tolist() == [True, False]
