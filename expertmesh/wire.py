"""Tensors on the wire: ``mx.array`` <-> ``expertmesh.v1.Tensor``.

This is the only module that builds or reads ``Tensor`` messages. Data is raw
little-endian bytes, row-major; decoding checks that the byte count matches
the shape and dtype before anything touches the data.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from .errors import InvalidRequestError
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


def encode(array: mx.array) -> pb.Tensor:
    """Serialize an array (one copy: MLX buffer -> bytes)."""
    code = _TO_WIRE.get(array.dtype)
    if code is None:
        raise TypeError(f"dtype {array.dtype} has no wire encoding")
    _, carrier = _CODECS[code]
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    data = np.asarray(array, dtype=carrier)  # a view of MLX memory when contiguous
    return pb.Tensor(data=data.tobytes(), shape=array.shape, dtype=code)


def encode_numpy(array: np.ndarray, dtype: "pb.DType") -> pb.Tensor:
    """Serialize a numpy array holding ``dtype`` values (bfloat16 as uint16)."""
    _, carrier = _CODECS[dtype]
    return pb.Tensor(data=np.ascontiguousarray(array, dtype=carrier).tobytes(), shape=array.shape, dtype=dtype)


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
    if len(tensor.data) != expected:
        raise InvalidRequestError(
            f"{name}: {len(tensor.data)} bytes for shape {list(shape)} "
            f"of {pb.DType.Name(tensor.dtype)} (expected {expected})"
        )
    return np.frombuffer(tensor.data, dtype=carrier).reshape(shape)


def decode(tensor: pb.Tensor, name: str = "tensor") -> mx.array:
    """Validate a Tensor and turn it into an ``mx.array`` (one copy)."""
    array = mx.array(decode_numpy(tensor, name))
    if tensor.dtype == pb.BFLOAT16:
        array = array.view(mx.bfloat16)
    return array


def mlx_dtype(code: "pb.DType"):
    return _CODECS[code][0]
