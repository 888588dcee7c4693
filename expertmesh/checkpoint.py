"""Read a safetensors checkpoint by its headers, and tensors by byte ranges.

Nodes use this to read only their experts' bytes (slices of stacked tensors
along the expert axis, or whole per-expert tensors); ``expertmesh plan`` uses
it to size a model from headers alone. A checkpoint is a directory, or a
Hugging Face repo id (``ORG/NAME[@REVISION]``, see ``hub``) whose weights
are fetched by the byte range as they are read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import mlx.core as mx
import numpy as np

from .errors import ModelError
from .files import INDEX, Range
from .hub import open_files

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
# the identity samples this many bytes at the start, middle and end of every tensor
SAMPLE = 64

@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str     # the safetensors file, relative to the checkpoint
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset of the data in `file`

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0].itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def rows(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        """``(start, count)`` of rows ``[lo, hi)`` of the first axis (all rows for None) in the file."""
        if rows is None:
            return self.offset, self.nbytes
        row_bytes = self.nbytes // self.shape[0]
        return self.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes


@dataclass(frozen=True)
class Identity:
    """What a node and its router must agree on: ``config`` hashes config.json,
    ``weights`` is ``LAYOUT.VALUES``: every tensor's name, dtype and shape, and
    a few sampled blocks of every tensor's bytes."""

    config: str
    weights: str

    def difference(self, config: str, weights: str, mine: str) -> str:
        """How another checkpoint's identity differs from this one, ``mine`` naming
        whose this is ("the router's"), in words; "" when it does not."""
        if config != self.config:
            return f"config {config} ({mine}: {self.config})"
        if weights == self.weights:
            return ""
        if not weights:
            return f"config {config} but no weights identity (an older expertmesh?)"
        (layout, values), (our_layout, our_values) = weights.partition(".")[::2], self.weights.partition(".")[::2]
        if layout != our_layout:
            return (f"other tensors under the same config {config}: their names, dtypes or shapes differ "
                    f"(layout {layout}; {mine}: {our_layout})")
        return (f"other weights under the same config {config} and tensor shapes (values {values}; {mine}: "
                f"{our_values}): a fine-tune of the same architecture?")


def config_hash(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Checkpoint:
    """A model directory or repo id: ``config.json`` plus (sharded) safetensors.

    Only files inside the directory (or the repo's cache folder) are read: a
    name in the index, or a symlink, that leads outside it is refused.

    Raises:
        ModelError: the directory, its config or its weights are missing or
            malformed; a repo id cannot be resolved or fetched.
    """

    def __init__(self, model: str | Path):
        if Path(model).expanduser().is_file():
            raise ModelError(f"{model} is a file: give the checkpoint's directory ({Path(model).parent}), "
                             "the one holding config.json")
        self.files = open_files(model)
        self.path = self.files.root
        if not self.files.exists("config.json"):
            raise ModelError(f"{model} has no config.json: not a model checkpoint")
        try:
            self.config = json.loads(self.files.text("config.json"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{self.path / 'config.json'} is not valid JSON: {e}") from None
        self.model_id = getattr(self.files, "name", self.path.name)
        self.config_hash = config_hash(self.config)

    @functools.cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry (read on first use)."""
        tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            tensors.update(_read_header(self.files, file))
        if not tensors:
            raise ModelError(f"{self.path} has no safetensors weights")
        return tensors

    @functools.cached_property
    def identity(self) -> Identity:
        """The config's hash and the weights' (headers plus sampled bytes; cheap: no tensor is read whole)."""
        return Identity(self.config_hash, self.files.memo("weights", self._weights_hash))

    def _weights_hash(self) -> str:
        layout, values = hashlib.sha256(), hashlib.sha256()
        infos = [self.tensors[n] for n in sorted(self.tensors)]
        ranges = [r for t in infos for r in _samples(t)]
        for t in infos:
            layout.update(json.dumps([t.name, t.dtype, list(t.shape)]).encode())
        for block in self.files.read_many(ranges):
            values.update(len(block).to_bytes(8, "little") + block)
        return f"{layout.hexdigest()[:12]}.{values.hexdigest()[:12]}"

    def _weight_files(self) -> list[str]:
        if self.files.exists(INDEX):
            try:
                weight_map = json.loads(self.files.text(INDEX)).get("weight_map", {})
                names = sorted(set(weight_map.values()))
            except (ValueError, AttributeError, TypeError):
                raise ModelError(f"{self.path / INDEX} is not a safetensors index (a weight_map of names to files)") from None
            if not all(isinstance(n, str) for n in names):
                raise ModelError(f"{self.path / INDEX}: the weight_map must name files")
        else:
            names = self.files.safetensors()
        for name in names:
            if not self.files.exists(name):
                raise ModelError(f"weight file {self.path / name} listed in the index is missing")
        return names

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def ranges(self, reads: Iterable[tuple[str, tuple[int, int] | None]]) -> list[Range]:
        """The byte ranges of ``(tensor, rows)`` reads (``rows`` as for ``read``)."""
        return [(self.tensors[n].file, *self.tensors[n].rows(rows)) for n, rows in reads]

    def prefetch(self, reads: Iterable[tuple[str, tuple[int, int] | None]]) -> None:
        """Fetch what these reads need and the caches lack, at once and with progress (no-op on disk)."""
        self.files.prefetch(self.ranges(reads))

    def read(self, name: str, rows: tuple[int, int] | None = None) -> mx.array:
        """Read one tensor, or rows ``[lo, hi)`` of its first axis.

        Only the requested bytes are read (or fetched).
        """
        info = self.tensors[name]
        shape = list(info.shape)
        start, count = info.rows(rows)
        if rows is not None:
            shape[0] = rows[1] - rows[0]
        carrier, dtype = _DTYPES[info.dtype]
        buf = self.files.read(info.file, start, count)
        array = mx.array(np.frombuffer(buf, dtype=carrier).reshape(shape))
        return array.view(dtype) if dtype == mx.bfloat16 else array

    def dense_dir(self, is_expert) -> Path:
        """A directory mlx-lm's ``load_model`` can read the dense weights from
        (the checkpoint itself, or a file of just those tensors built from a repo's byte ranges)."""
        return self.files.dense_dir(self, is_expert)


def _samples(t: TensorInfo) -> list[Range]:
    if t.nbytes <= 3 * SAMPLE:
        return [(t.file, t.offset, t.nbytes)]
    middle = t.offset + (t.nbytes // 2 // SAMPLE) * SAMPLE
    return [(t.file, t.offset, SAMPLE), (t.file, middle, SAMPLE), (t.file, t.offset + t.nbytes - SAMPLE, SAMPLE)]


def _read_header(files, file: str) -> dict[str, TensorInfo]:
    """Every tensor's entry, checked for sense (the data itself may be absent: ``plan`` reads headers alone)."""
    where = files.root / file
    (n,) = struct.unpack("<Q", files.read(file, 0, 8))
    if n > _MAX_HEADER:
        raise ModelError(f"{where} has an implausible header size {n}")
    try:
        header = json.loads(files.read(file, 8, n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelError(f"{where} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise ModelError(f"{where} has a corrupt safetensors header")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{where}: tensor {name} has a malformed header entry") from None
        if dtype not in _DTYPES:
            raise ModelError(f"{where}: tensor {name} has unsupported dtype {dtype}")
        info = TensorInfo(name, file, dtype, shape, 8 + n + begin) if _ints(shape, begin, end) else None
        if info is None or end - begin != info.nbytes:
            raise ModelError(f"{where}: tensor {name} has shape {list(shape)} and offsets {[begin, end]} "
                             f"that do not agree")
        out[name] = info
    return out


def _ints(shape: tuple, *offsets) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets)
