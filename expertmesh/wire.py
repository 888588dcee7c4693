"""Tensors on the wire: ``mx.array`` <-> ``expertmesh.v1.Tensor``.

This is the only module that builds or reads ``Tensor`` messages. Data is raw
little-endian bytes, row-major; decoding checks that the byte count matches
the shape and dtype before anything touches the data.
"""

from __future__ import annotations

import math
import socket
import struct

import mlx.core as mx
import numpy as np

from google.protobuf.message import DecodeError

from . import hostcopy
from .errors import InvalidRequestError, RequestTooLargeError
from .v1 import expertmesh_pb2 as pb

# DType -> (mlx dtype, numpy dtype used to carry the bytes)
_CODECS = {
    pb.FLOAT32: (mx.float32, np.dtype("<f4")),
    pb.FLOAT16: (mx.float16, np.dtype("<f2")),
    pb.BFLOAT16: (mx.bfloat16, np.dtype("<u2")),  # numpy has no bfloat16
    pb.INT32: (mx.int32, np.dtype("<i4")),
}
_TO_WIRE = {mlx_dtype: code for code, (mlx_dtype, _) in _CODECS.items()}

_missing = set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED} - set(_CODECS)
assert not _missing, f"no codec for wire dtypes {_missing}"

MAX_DIM = 1 << 31


def wire_dtype(dtype) -> "pb.DType":
    code = _TO_WIRE.get(dtype)
    if code is None:
        raise TypeError(f"dtype {dtype} has no wire encoding")
    return code


def mlx_dtype(code: "pb.DType"):
    """The mlx dtype of ``code``."""
    return _CODECS[code][0]


def carrier(code: "pb.DType") -> np.dtype:
    """The numpy dtype that carries ``code``'s values (uint16 for bfloat16)."""
    return np.dtype(_CODECS[code][1])


def to_numpy(array: mx.array) -> np.ndarray:
    """An evaluated array's memory as numpy, without an MLX op when it is
    row-contiguous (bfloat16 as uint16 bits)."""
    carrier_dtype = _CODECS[wire_dtype(array.dtype)][1]
    try:
        return np.frombuffer(memoryview(array), dtype=carrier_dtype).reshape(array.shape)
    except (ValueError, BufferError, TypeError):  # strided view: let mlx copy it
        return np.asarray(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)


def read_back(arrays: list[mx.array], states=()) -> list[np.ndarray]:
    """Evaluate ``arrays`` (with ``states``) and read each back flat, as its
    wire carrier, in one host read: they are packed side by side on the
    device as 32-bit words first. On the H200 each first host read of what a
    kernel wrote costs ~100 µs a buffer (``benchmarks/hotpath.py``), far more
    than the one concatenation. One array, or one whose bytes are not whole
    32-bit words, is read as it is.

    On MLX's CUDA backend the words go through this thread's pinned buffer
    (``expertmesh.hostcopy``): ~40 against ~150 µs for a decode step's 4 KB.
    Then what this returns is a view of that buffer, valid until the
    thread's next ``read_back``: a caller that keeps it longer copies it.

    Raises:
        TypeError: an array of a dtype the wire does not carry (before any work).
    """
    carriers = [_CODECS[wire_dtype(a.dtype)][1] for a in arrays]
    whole_words = not any(a.size * a.dtype.size % 4 for a in arrays)
    pinned = whole_words and hostcopy.fits(sum(a.nbytes for a in arrays)) and hostcopy.available()
    if not pinned and (len(arrays) <= 1 or not whole_words):
        mx.eval(*arrays, states)
        return [to_numpy(a).reshape(-1) for a in arrays]
    flat = [a.reshape(-1).view(mx.uint32) for a in arrays]
    packed = flat[0] if len(flat) == 1 else mx.concatenate(flat)
    if pinned:
        host = hostcopy.read(packed, states)
    else:
        mx.eval(packed, states)
        host = np.frombuffer(memoryview(packed), np.uint32)
    out, at = [], 0
    for a, carrier_dtype in zip(arrays, carriers):
        words = a.size * a.dtype.size // 4
        out.append(host[at:at + words].view(carrier_dtype))
        at += words
    return out


def to_float32(values: np.ndarray, code: "pb.DType") -> np.ndarray:
    """Wire-carrier numpy values -> float32 (bfloat16 bits widened exactly)."""
    if code == pb.BFLOAT16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def from_float32(values: np.ndarray, code: "pb.DType") -> np.ndarray:
    """float32 -> wire-carrier numpy values of ``code``, rounding to nearest even."""
    if code == pb.BFLOAT16:
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return values.astype(_CODECS[code][1], copy=False)


def from_numpy(values: np.ndarray, code: "pb.DType", staging=None, key=None) -> mx.array:
    """Wire-carrier numpy values -> ``mx.array`` of ``code``'s dtype (one
    copy); with a ``Staging`` (expertmesh.staging), written into ``key``'s
    array there, under that module's rule."""
    array = mx.array(values) if staging is None else staging.put(key, np.ascontiguousarray(values))
    return array.view(mx.bfloat16) if code == pb.BFLOAT16 else array


def to_device(values: np.ndarray, code: "pb.DType") -> mx.array:
    """Wire-carrier values as a new ``mx.array`` of ``code``'s dtype, for
    values that are not staged. On MLX's CUDA backend through the thread's
    pinned buffer (``expertmesh.hostcopy``), evaluated: on the H200 ~70 µs
    for a decode step's 4 KB and ~420 for a 512-token prompt's 2 MB,
    against ~100 and ~1,200 as a fresh ``mx.array(numpy)``
    (``benchmarks/hostcopy.py``). Elsewhere ``from_numpy``."""
    if values.nbytes % 4 or not hostcopy.fits(values.nbytes) or not hostcopy.available():
        return from_numpy(values, code)
    return hostcopy.write(values, _CODECS[code][0])


def encode(array: mx.array) -> pb.Tensor:
    """Serialize an evaluated array (one copy: MLX buffer -> bytes)."""
    return encode_numpy(to_numpy(array), wire_dtype(array.dtype))


def encode_numpy(array: np.ndarray, dtype: "pb.DType") -> pb.Tensor:
    """Serialize a numpy array holding ``dtype`` values (bfloat16 as uint16)."""
    tensor = pb.Tensor()
    encode_into(tensor, array, dtype)
    return tensor


def encode_into(tensor: pb.Tensor, array: np.ndarray, dtype: "pb.DType") -> None:
    """Serialize into a message's own (empty) Tensor field: no copy of a
    finished Tensor into it (a few µs a request on the hot path)."""
    _, carrier = _CODECS[dtype]
    tensor.data = np.ascontiguousarray(array, dtype=carrier).tobytes()
    tensor.shape.extend(array.shape)
    tensor.dtype = dtype


SPLICE_BYTES = 64 << 10  # a tensor from this size travels as a Framed's tail


class Framed:
    """A message whose one large tensor's bytes are kept out of it, to be
    sent from the array's own memory after the rest (``send_frame``): no
    ``tobytes`` copy and no copy into the serialized message (2 MB a
    512-token layer's request or answer). The tail is that tensor's ``data``
    field once more, nested as in the message; protobuf merges the two
    occurrences of each enclosing message, so the frame parses to the same
    message as :meth:`materialized`.

    ``path``: field numbers from ``message`` down to ``tensor``, the Tensor
    field in it (its shape and dtype set, its data left empty)."""

    __slots__ = ("message", "path", "tensor", "data", "whole")

    def __init__(self, message, path: tuple[int, ...], tensor: pb.Tensor, data: np.ndarray):
        self.message, self.path, self.tensor, self.data = message, path, tensor, data
        self.whole = False  # the bytes are in the message (materialized): sent as it is

    @property
    def request_id(self) -> int:
        return self.message.request_id

    @request_id.setter
    def request_id(self, value: int) -> None:
        self.message.request_id = value

    def materialized(self):
        """``message`` with the tensor's bytes in it (the gRPC path's form)."""
        if not self.whole:
            self.tensor.data = self.data.tobytes()
            self.whole = True
        return self.message

    def tail(self) -> tuple[bytes, memoryview]:
        """The headers of the fields that enclose the bytes (outermost
        first), and the bytes."""
        view = memoryview(self.data).cast("B")
        size, heads = len(view), []
        for number in reversed((*self.path, _TENSOR_DATA)):  # length-delimited (wire type 2), innermost first
            head = _varint(number << 3 | 2) + _varint(size)
            heads.insert(0, head)
            size += len(head)
        return b"".join(heads), view


_TENSOR_DATA = pb.Tensor.DESCRIPTOR.fields_by_name["data"].number


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def framed_tensor(message, path: tuple[str, ...], values: np.ndarray, dtype: "pb.DType"):
    """``message`` with ``values`` as the Tensor at ``path`` (field names):
    in it when small, else as a :class:`Framed` tail (``values`` must then
    stay unchanged until it is sent)."""
    node, numbers = message, []
    for name in path:
        numbers.append(node.DESCRIPTOR.fields_by_name[name].number)
        node = getattr(node, name)
    _, carrier_dtype = _CODECS[dtype]
    values = np.ascontiguousarray(values, dtype=carrier_dtype)
    if values.nbytes < SPLICE_BYTES:
        encode_into(node, values, dtype)
        return message
    node.shape.extend(values.shape)
    node.dtype = dtype
    return Framed(message, tuple(numbers), node, values)


def materialized(message):
    """A message as gRPC sends it: a ``Framed`` one with its tensor put in."""
    return message.materialized() if isinstance(message, Framed) else message


def decode_numpy(tensor: pb.Tensor, name: str = "tensor") -> np.ndarray:
    """Validate a Tensor and view its bytes as numpy (bfloat16 stays uint16).

    Raises:
        InvalidRequestError: unknown dtype, bad shape, or a byte count that
            does not match the shape.
    """
    if tensor.dtype not in _CODECS:
        raise InvalidRequestError(f"{name}: unknown dtype {tensor.dtype}")
    shape = tuple(tensor.shape)
    if any(d < 0 or d >= MAX_DIM for d in shape):
        raise InvalidRequestError(f"{name}: invalid shape {list(shape)}")
    _, carrier = _CODECS[tensor.dtype]
    expected = math.prod(shape) * carrier.itemsize
    data = tensor.data  # each read of a bytes field is a copy of it
    if len(data) != expected:
        raise InvalidRequestError(
            f"{name}: {len(data)} bytes for shape {list(shape)} "
            f"of {pb.DType.Name(tensor.dtype)} (expected {expected})"
        )
    return np.frombuffer(data, dtype=carrier).reshape(shape)


def all_finite(values: np.ndarray, code: "pb.DType") -> bool:
    """No NaN or inf among wire-carrier values (integers always pass)."""
    if code == pb.BFLOAT16:  # uint16 bits: an all-ones exponent is inf or NaN
        return not ((values & 0x7F80) == 0x7F80).any()
    return code == pb.INT32 or bool(np.isfinite(values).all())


def decode(tensor: pb.Tensor, name: str = "tensor", staging=None, key=None) -> mx.array:
    """Validate a Tensor and turn it into an ``mx.array`` (one copy; see ``from_numpy``)."""
    return from_numpy(decode_numpy(tensor, name), tensor.dtype, staging, key)


# --- data-plane framing: 4-byte little-endian length, then the message ------
_LEN = struct.Struct("<I")
RECV_CHUNK = 64 << 10  # bytes a frame may have allocated beyond those received


def send_frame(sock: socket.socket, message) -> int:
    """Send ``message`` (or a ``Framed`` one) as one frame; returns its bytes
    (the length prefix's not counted: as ``ByteSize``, which would serialize
    it once more). A large frame goes out in two writes rather than copied
    behind its prefix; a ``Framed`` one's tail straight from its array."""
    if isinstance(message, Framed) and message.whole:  # sent on the gRPC path once: the bytes are in it
        message = message.message
    if isinstance(message, Framed):
        body = message.message.SerializeToString()
        heads, view = message.tail()
        n = len(body) + len(heads) + len(view)
        sock.sendall(_LEN.pack(n) + body + heads)
        sock.sendall(view)
        return n
    data = message.SerializeToString()
    if len(data) <= RECV_CHUNK:
        sock.sendall(_LEN.pack(len(data)) + data)
    else:
        sock.sendall(_LEN.pack(len(data)))
        sock.sendall(data)
    return len(data)


def recv_frame(sock: socket.socket, cls, max_bytes: int):
    """Read one frame and parse it as ``cls``; ``None`` when the peer closed.

    Raises:
        RequestTooLargeError: the frame is longer than ``max_bytes``.
        InvalidRequestError: the bytes do not parse as ``cls``.
    """
    return recv_frame_sized(sock, cls, max_bytes)[0]


def recv_frame_sized(sock: socket.socket, cls, max_bytes: int):
    """``recv_frame``, and the frame's bytes: ``(message or None, bytes)``."""
    head = recv_exact(sock, _LEN.size)
    if head is None:
        return None, 0
    (n,) = _LEN.unpack(head)
    if n > max_bytes:
        raise RequestTooLargeError(f"frame of {n} bytes exceeds the {max_bytes}-byte limit")
    data = recv_exact(sock, n)
    if data is None:
        return None, 0
    try:
        return cls.FromString(data), n
    except DecodeError:
        raise InvalidRequestError(f"frame is not a valid {cls.DESCRIPTOR.name}") from None


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes from ``sock``; ``None`` when the peer closed first.

    Memory grows with the bytes that arrive (at most twice them, plus
    ``RECV_CHUNK``), not with what a length prefix claims: a header that
    announces 64 MB and then silence costs ``RECV_CHUNK``.
    """
    if n <= RECV_CHUNK:
        buf = _recv_into(sock, bytearray(n))
        return None if buf is None else bytes(buf)
    parts, got = [], 0
    while got < n:
        part = _recv_into(sock, bytearray(min(n - got, max(RECV_CHUNK, got))))  # doubles as bytes arrive
        if part is None:
            return None
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _recv_into(sock: socket.socket, buf: bytearray) -> bytearray | None:
    view, got = memoryview(buf), 0
    while got < len(buf):
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return buf
