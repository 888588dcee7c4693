"""Host transfers of the hot path: staged input arrays (each put is what the
next kernel reads, and what was computed from an earlier put keeps its
value), and a layer's routed tokens read back as one packed buffer."""

import mlx.core as mx
import numpy as np
import pytest

from expertmesh import wire
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.router.dispatcher import _DeviceSum, _Sum, _to_host
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


def test_memory_exported_read_only_is_written_through_its_address(monkeypatch):
    """MLX's CUDA backend exports an array's memory read-only; the staged write must still land."""
    import builtins

    from expertmesh import staging as module

    monkeypatch.setattr(module, "memoryview", lambda a: builtins.memoryview(a).toreadonly(), raising=False)
    staging = Staging()
    staging.put(0, np.zeros(4, np.float32))
    assert (staging.put(0, np.arange(4, dtype=np.float32)) * 1).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("score_dtype", [mx.float32, mx.bfloat16])
# H 7: rows straddle 32-bit words in 16-bit dtypes; (1, 3) rows of 7 halves: the whole is not words either
@pytest.mark.parametrize("B,T,H", [(2, 3, 6), (2, 3, 7), (1, 3, 7)])
def test_a_layers_tokens_read_back_packed_are_the_arrays_values(dtype, score_dtype, B, T, H):
    x = mx.random.normal((B, T, H), key=mx.random.key(1)).astype(dtype)
    inds = mx.array(np.arange(B * T * 4).reshape(B, T, 4) % 11, dtype=mx.uint32)
    scores = mx.random.uniform(shape=(B, T, 4), key=mx.random.key(2)).astype(score_dtype)
    hidden, ids, weights = _to_host(x, inds, scores)
    n = B * T
    assert hidden.shape == (n, H) and ids.shape == (n, 4) and weights.shape == (n, 4)
    assert ids.dtype == np.int32 and weights.dtype == np.float32
    assert np.array_equal(hidden, wire.to_numpy(x).reshape(n, H))
    assert ids.tolist() == np.array(inds).reshape(n, 4).tolist()
    assert np.array_equal(weights, np.array(scores.astype(mx.float32)).reshape(n, 4))


@pytest.mark.parametrize("n", [6, 7])  # 7 halves: not whole 32-bit words, read one by one
def test_arrays_read_back_together_are_their_values(n):
    x = mx.random.normal((n,), key=mx.random.key(3)).astype(mx.bfloat16)
    ids = mx.array([3, 1, 4, 1, 5], dtype=mx.int32)
    w = mx.random.uniform(shape=(2, 2), key=mx.random.key(4))
    hidden, got_ids, weights = wire.read_back([x, ids, w])
    assert np.array_equal(hidden, wire.to_numpy(x)) and hidden.dtype == np.uint16
    assert got_ids.tolist() == [3, 1, 4, 1, 5] and got_ids.dtype == np.int32
    assert np.array_equal(weights, np.array(w).reshape(-1))
    (alone,) = wire.read_back([ids])
    assert alone.tolist() == [3, 1, 4, 1, 5]
    assert wire.read_back([]) == []
    with pytest.raises(TypeError, match="no wire encoding"):
        wire.read_back([ids, mx.zeros((4,), mx.bool_)])


def _summed(T: int, H: int, answers, code, seed: int) -> tuple[mx.array, np.ndarray]:
    """``answers`` ((rows or None, wire dtype) each) added by ``_DeviceSum`` (evaluated) and by ``_Sum``."""
    rng = np.random.default_rng(seed)
    host, device = _Sum((T, H)), _DeviceSum((T, H))
    for rows, part_code in answers:
        n = T if rows is None else rows.size
        values = wire.from_float32((rng.standard_normal((n, H)) * 3).astype(np.float32), part_code)
        host.add(rows, values, part_code)
        device.add(rows, values, part_code)
    got = device.array(code)
    mx.eval(got)
    return got, wire.to_numpy(host.array(code))


@pytest.mark.parametrize("code", [pb.BFLOAT16, pb.FLOAT16, pb.FLOAT32])
@pytest.mark.parametrize("answers", ["one whole", "two whole", "rows each", "whole and rows", "none"])
def test_a_layers_answers_added_on_the_device_are_the_host_sum_bit_for_bit(code, answers):
    parts = {"one whole": [None], "two whole": [None, None], "rows each": [np.arange(0, 24, 2), np.arange(1, 24, 2)],
             "whole and rows": [None, np.array([0, 5, 7, 23])], "none": []}[answers]
    got, want = _summed(24, 64, [(rows, code) for rows in parts], code, seed=3)
    assert got.dtype == wire.mlx_dtype(code) and got.shape == (24, 64)
    assert np.array_equal(wire.to_numpy(got), want)


def test_answers_of_another_dtype_than_the_layers_add_up_the_same_on_the_device():
    answers = [(None, pb.FLOAT32), (np.array([1, 2, 9]), pb.FLOAT16), (None, pb.BFLOAT16)]
    got, want = _summed(16, 32, answers, pb.BFLOAT16, seed=4)
    assert np.array_equal(wire.to_numpy(got), want)


def _sent_and_received(message) -> tuple[object, int, int]:
    """``message`` sent with ``wire.send_frame`` over a socket pair: the
    message the other end parses, and the byte counts of both ends."""
    import socket
    import threading

    cls = type(message.message if isinstance(message, wire.Framed) else message)
    a, b = socket.socketpair()
    got = {}
    reader = threading.Thread(target=lambda: got.update(r=wire.recv_frame_sized(b, cls, 1 << 28)))
    reader.start()
    try:
        sent = wire.send_frame(a, message)
    finally:
        reader.join(timeout=30)
        a.close(), b.close()
    parsed, received = got["r"]
    return parsed, sent, received


@pytest.mark.parametrize("rows", [1, 40, 600])  # 600 x 64 float32 values: over SPLICE_BYTES, a Framed tail
def test_a_prompts_tensor_sent_from_its_own_memory_parses_to_the_whole_message(rows):
    from expertmesh.router.link import expert_request, stage_request

    rng = np.random.default_rng(rows)
    hidden = rng.standard_normal((rows, 64)).astype(np.float32)
    ids = rng.integers(-1, 8, (rows, 2)).astype(np.int32)
    weights = rng.random((rows, 2)).astype(np.float32)
    big = hidden.nbytes >= wire.SPLICE_BYTES
    for message in (expert_request(3, hidden, pb.FLOAT32, ids, weights),
                    stage_request(5, mx.array(hidden[None]), [11], [0], trim=2),
                    wire.framed_tensor(pb.ForwardResponse(request_id=9, compute_seconds=0.5), ("output",),
                                       wire.to_numpy(mx.array(hidden)), pb.FLOAT32)):
        assert isinstance(message, wire.Framed) == big
        parsed, sent, received = _sent_and_received(message)
        whole = wire.materialized(message)
        assert parsed == whole
        assert sent == received >= whole.ByteSize()
        op = parsed if isinstance(parsed, pb.ForwardResponse) else getattr(parsed, parsed.WhichOneof("op"))
        got = wire.decode_numpy(op.output if op is parsed else op.hidden, "hidden")
        assert got.reshape(hidden.shape).tobytes() == hidden.tobytes()
        again, sent_again, _ = _sent_and_received(message)  # sent whole once (gRPC): as it is now, bytes once
        assert again == whole and sent_again == whole.ByteSize()
