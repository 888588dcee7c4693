"""Read a safetensors checkpoint by its headers, and tensors by byte ranges.

Nodes use this to read only their experts' bytes (slices of stacked tensors
along the expert axis, or whole per-expert tensors); ``expertmesh plan`` uses
it to size a model from headers alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ModelError

logger = logging.getLogger(__name__)

# safetensors dtype -> (numpy carrier, mlx dtype); bfloat16 travels as uint16
_DTYPES = {
    "F32": (np.dtype("<f4"), mx.float32),
    "F16": (np.dtype("<f2"), mx.float16),
    "BF16": (np.dtype("<u2"), mx.bfloat16),
    "I32": (np.dtype("<i4"), mx.int32),
    "U32": (np.dtype("<u4"), mx.uint32),
    "I64": (np.dtype("<i8"), mx.int64),
    "U8": (np.dtype("u1"), mx.uint8),
    "I8": (np.dtype("i1"), mx.int8),
}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the data in `file`

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0].itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def config_hash(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Checkpoint:
    """A model directory: ``config.json`` plus (sharded) safetensors.

    Only files inside the directory are read: a name in the index, or a
    symlink, that leads outside it is refused.

    Raises:
        ModelError: the directory, its config or its weights are missing or
            malformed.
    """

    def __init__(self, path):
        self.path = Path(path).expanduser().resolve()
        if self.path.is_file():
            raise ModelError(f"{path} is a file: give the checkpoint's directory ({Path(path).parent}), "
                             "the one holding config.json")
        if not self.path.is_dir():
            raise ModelError(f"model directory {path} does not exist")
        config_file = self._inside("config.json")
        if not config_file.is_file():
            raise ModelError(f"{path} has no config.json: not a model checkpoint")
        try:
            self.config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelError(f"{config_file} is not valid JSON: {e}") from None
        self.model_id = self.path.name
        self.config_hash = config_hash(self.config)

    @functools.cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry (read on first use)."""
        tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            tensors.update(_read_header(file))
        if not tensors:
            raise ModelError(f"{self.path} has no safetensors weights")
        return tensors

    def _inside(self, name: str) -> Path:
        """``name`` resolved within the directory.

        Raises:
            ModelError: it (or a symlink on the way) leads outside.
        """
        file = (self.path / name).resolve()
        if not file.is_relative_to(self.path):
            raise ModelError(f"{name!r} lies outside the model directory {self.path}")
        return file

    def _weight_files(self) -> list[Path]:
        index = self._inside("model.safetensors.index.json")
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
                names = sorted(set(weight_map.values()))
            except (ValueError, AttributeError, TypeError):
                raise ModelError(f"{index} is not a safetensors index (a weight_map of names to files)") from None
            if not all(isinstance(n, str) for n in names):
                raise ModelError(f"{index}: the weight_map must name files")
        else:
            names = sorted(p.name for p in self.path.glob("*.safetensors"))
        files = []
        for name in names:
            file = self._inside(name)
            if not file.is_file():
                raise ModelError(f"weight file {file} listed in the index is missing")
            files.append(file)
        return files

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str, rows: tuple[int, int] | None = None) -> mx.array:
        """Read one tensor, or rows ``[lo, hi)`` of its first axis, from disk.

        Only the requested bytes are read.
        """
        info = self.tensors[name]
        shape = list(info.shape)
        start, count = info.offset, info.nbytes
        if rows is not None:
            lo, hi = rows
            row_bytes = info.nbytes // shape[0]
            start += lo * row_bytes
            count = (hi - lo) * row_bytes
            shape[0] = hi - lo
        carrier, dtype = _DTYPES[info.dtype]
        buf = bytearray(count)
        # the file was resolved inside the directory; no symlink put there since is followed
        with open(os.open(info.file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb") as f:
            f.seek(start)
            if f.readinto(buf) != count:
                raise ModelError(f"{info.file} is truncated (tensor {name})")
        array = mx.array(np.frombuffer(buf, dtype=carrier).reshape(shape))
        return array.view(dtype) if dtype == mx.bfloat16 else array


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Every tensor's entry, checked for sense (the data itself may be absent: ``plan`` reads headers alone)."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelError(f"{file} is not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ModelError(f"{file} has an implausible header size {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{file} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file} has a corrupt safetensors header")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{file}: tensor {name} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise ModelError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        info = TensorInfo(name, file, dtype, shape, 8 + n + begin) if _ints(shape, begin, end) else None
        if info is None or end - begin != info.nbytes:
            raise ModelError(f"{file}: tensor {name} has shape {list(shape)} and offsets {[begin, end]} "
                             f"that do not agree")
        out[name] = info
    return out


def _ints(shape: tuple, *offsets) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets)
