"""Input arrays kept for reuse and written in place from the host.

``mx.array(numpy)`` gives every transfer a fresh buffer (managed memory,
on MLX's CUDA backend). A node's expert request instead writes its one
input buffer into an array kept per size and MLX thread. On the H200
(``benchmarks/hotpath.py --parts ab``, alternating rounds in one process) a
node's request took 805 µs staged against 835 µs fresh; a 4 KB transfer and
one kernel took 33.4 against 112.6 µs on one machine and 26.0 against 28.1
on another. The router does not stage: there, written in place, a layer's
answer cost ~70 µs more than a fresh array. Nor does a stage span's request:
a 6-layer span's step took 2,549 µs fed from staging against 2,312 fresh
(``benchmarks/spanbuild.py``).

The rule that makes this safe: an array ``put`` under a key must have been
consumed (evaluated, with whatever reads it) before the next ``put`` under the
same key and shape, since that overwrites its memory. Each user picks keys
for which this holds, and says why where it does.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

# numpy dtypes put() stages: those the wire carries (bfloat16 travels as uint16 bits)
_DTYPES = frozenset(np.dtype(t) for t in (np.uint16, np.uint32, np.int32, np.float32, np.float16))


def _writable(array: mx.array, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A writable numpy view of an evaluated array's memory. MLX's CUDA
    backend exports it read-only (arrays are values to MLX); the view goes
    through its address, and ``Staging``'s rule keeps MLX from noticing."""
    base = np.frombuffer(memoryview(array), np.uint8)
    if base.flags.writeable:
        return base.view(dtype).reshape(shape)
    raw = (ctypes.c_char * base.nbytes).from_address(base.ctypes.data)
    return np.frombuffer(raw, dtype).reshape(shape)


class Staging:
    """Arrays to write host values into, one per (key, shape, dtype); at most
    ``max_arrays`` are kept (past that all are let go: arrays still in use keep
    their memory through their own references)."""

    def __init__(self, max_arrays: int = 64):
        self.max_arrays = max_arrays
        self._arrays: dict[tuple, tuple[mx.array, np.ndarray]] = {}

    def buffer(self, key, shape: tuple[int, ...], dtype) -> tuple[mx.array, np.ndarray]:
        """The array for ``key`` and a writable numpy view of its memory
        (``dtype`` one the wire carries); it holds what was written last."""
        dtype = np.dtype(dtype)
        k = (key, tuple(shape), dtype)
        entry = self._arrays.get(k)
        if entry is None:
            if len(self._arrays) >= self.max_arrays:
                self._arrays.clear()
            array = mx.array(np.zeros(shape, dtype))  # its own buffer, made once
            mx.eval(array)
            entry = self._arrays[k] = (array, _writable(array, dtype, shape))
        return entry

    def put(self, key, values: np.ndarray) -> mx.array:
        """``values`` as an ``mx.array`` of their dtype, written into ``key``'s array."""
        if values.dtype not in _DTYPES:
            return mx.array(values)
        array, view = self.buffer(key, values.shape, values.dtype)
        np.copyto(view, values)
        return array
