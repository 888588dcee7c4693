"""Host reads and writes of arrays through pinned memory, on MLX's CUDA backend.

MLX's CUDA backend keeps a kernel's output in device memory. The first host
read of it moves it: ``cudaMallocManaged`` of a fresh buffer, a copy into it,
page faults as the host reads it (``move_to_unified_memory`` in MLX's
``backend/cuda/allocator.cpp``). On the H200 that is ~130 µs for 4 KB
(``results/uvm-20261202-s8-a.json``), and a MoE layer's round trip does it
twice: the router reads the hidden states, the node its output. A fresh
``mx.array(numpy)`` costs ~110 µs more the same way.

Here instead each thread keeps one page-locked host buffer, mapped for the
GPU (``cuMemHostAlloc``; it grows by doubling), and a one-line kernel
(``mx.fast.cuda_kernel``, one each way for the process, the buffer's
address an input) copies an array's 32-bit words into it, or from it into
a new array. The GPU writes the host's memory itself; after the evaluation
the host reads it in place.

:func:`read` and :func:`write` are used where that path is on
(:func:`available`: MLX's GPU is CUDA and the driver gave the memory);
elsewhere, and for arrays whose bytes are not whole 32-bit words, callers
keep MLX's own way. ``EXPERTMESH_PINNED=0`` turns it off (for A/B
measurements: ``benchmarks/hostcopy.py``).

The rule for callers: what :func:`read` returns is a view of the thread's
buffer, valid until that thread's next :func:`read` or :func:`write`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import mlx.core as mx
import numpy as np

logger = logging.getLogger(__name__)

ENV = "EXPERTMESH_PINNED"
MAX_BYTES = 16 << 20  # larger transfers keep MLX's own copies: a thread's buffer stays below twice this
_FIRST_BYTES = 1 << 16
_THREADS = 256
_POISON = 0x7FC07FC0  # NaN as float32, and as both halves' bfloat16

# the buffer's device address comes in as two 32-bit words (addr), so one kernel serves every buffer
_ADDRESS = "(static_cast<unsigned long long>(addr[1]) << 32) | addr[0]"
_READ_SOURCE = f"""
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < src_shape[0]) {{ reinterpret_cast<unsigned int*>({_ADDRESS})[i] = src[i]; }}
    if (i == 0) {{ done[0] = 1; }}
"""
_WRITE_SOURCE = f"""
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n[0]) {{ dst[i] = reinterpret_cast<const unsigned int*>({_ADDRESS})[i]; }}
"""


class _Driver:
    """The CUDA driver's page-locked host memory, through ``libcuda``."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._check(self.lib.cuInit(0), "cuInit")
        device = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
        self.context = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.context), device),
                    "cuDevicePrimaryCtxRetain")  # the context MLX's runtime calls use

    @staticmethod
    def _check(result: int, what: str) -> None:
        if result != 0:
            raise OSError(f"{what} failed with CUDA error {result}")

    def host_alloc(self, nbytes: int) -> tuple[int, int]:
        """(host address, its device address) of ``nbytes`` page-locked, mapped, portable."""
        host, dev = ctypes.c_void_p(), ctypes.c_uint64()
        self._check(self.lib.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        try:
            self._check(self.lib.cuMemHostAlloc(ctypes.byref(host), ctypes.c_size_t(nbytes), 0x3), "cuMemHostAlloc")
            self._check(self.lib.cuMemHostGetDevicePointer_v2(ctypes.byref(dev), host, 0),
                        "cuMemHostGetDevicePointer")
        finally:
            self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        return host.value, dev.value

    def host_free(self, host: int) -> None:
        """Give back what ``host_alloc`` gave (nothing may still use it)."""
        self._check(self.lib.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        try:
            self._check(self.lib.cuMemFreeHost(ctypes.c_void_p(host)), "cuMemFreeHost")
        finally:
            self.lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


class _Emulated:
    """``EXPERTMESH_PINNED=emulate``: the same buffers and the same rule on
    any backend, the copies made by MLX and numpy, so that the CPU tests hold
    every caller to the rule (a view kept too long reads the next values)."""


class _Buffer:
    """A page-locked buffer, and its device address as the kernels take it."""

    def __init__(self, driver: "_Driver | _Emulated", nbytes: int):
        self.nbytes = nbytes
        if isinstance(driver, _Emulated):
            self.words, self.address, self.host = np.zeros(nbytes // 4, np.uint32), None, 0
            return
        host, dev = driver.host_alloc(nbytes)
        self.host = host
        self.words = np.frombuffer((ctypes.c_uint32 * (nbytes // 4)).from_address(host), np.uint32)
        self.address = mx.array([dev & 0xFFFFFFFF, dev >> 32], dtype=mx.uint32)
        mx.eval(self.address)


_kernels: dict[bool, object] = {}


def _kernel(to_host: bool):
    """The copy kernel each way (JIT-compiled on its first use in the process)."""
    if to_host not in _kernels:
        _kernels[to_host] = (
            mx.fast.cuda_kernel(name="expertmesh_to_host", input_names=["src", "addr"], output_names=["done"],
                                source=_READ_SOURCE) if to_host else
            mx.fast.cuda_kernel(name="expertmesh_from_host", input_names=["n", "addr"], output_names=["dst"],
                                source=_WRITE_SOURCE))
    return _kernels[to_host]


class _State(threading.local):
    """A thread's two buffers: what it reads, what it writes (apart, so that a
    write never overwrites a read the thread still holds)."""
    reads: _Buffer | None = None
    writes: _Buffer | None = None


_lock = threading.Lock()
_driver: "_Driver | _Emulated | None" = None
_checked = False
_local = _State()


def available() -> bool:
    """Whether this process reads and writes through pinned memory: MLX's
    default device is a CUDA GPU, the driver gave the memory, and
    ``EXPERTMESH_PINNED`` is not ``0`` (or it is ``emulate``: see
    ``_Emulated``). Decided once per process."""
    global _checked, _driver
    if _checked:
        return _driver is not None
    with _lock:
        if not _checked:
            _driver = _probe()
            _checked = True
    return _driver is not None


def _reset() -> None:
    """Decide again at the next ``available()`` (for tests that change ``EXPERTMESH_PINNED``)."""
    global _checked, _driver
    with _lock:
        _checked, _driver = False, None
        _local.reads = _local.writes = None


def _probe() -> "_Driver | _Emulated | None":
    setting = os.environ.get(ENV, "1")
    if setting == "0":
        logger.info("host copies through pinned memory: off (%s=0)", ENV)
        return None
    if setting == "emulate":
        logger.info("host copies through pinned memory: emulated (%s=emulate)", ENV)
        return _Emulated()
    try:
        cuda = getattr(mx, "cuda", None)
        if mx.default_device().type != mx.DeviceType.gpu or cuda is None or not cuda.is_available():
            return None
        driver = _Driver()
        reads, writes = _Buffer(driver, _FIRST_BYTES), _Buffer(driver, _FIRST_BYTES)
        probe = mx.arange(8, dtype=mx.uint32) * 3  # one round trip each way, checked
        mx.eval(probe)
        if not np.array_equal(_read_into(reads, probe), np.arange(8, dtype=np.uint32) * 3):
            raise RuntimeError("the copy to the host read back other values")
        back = _write_from(writes, np.arange(5, dtype=np.uint32) + 7)
        if not np.array_equal(np.array(back), np.arange(5, dtype=np.uint32) + 7):
            raise RuntimeError("the copy from the host wrote other values")
    except Exception as e:  # noqa: BLE001 no driver, no JIT, an old MLX: MLX's own copies, as before
        logger.info("host copies through pinned memory: not available (%s: %s); MLX's own copies",
                    type(e).__name__, e)
        return None
    _local.reads, _local.writes = reads, writes
    return driver


def _buffer(nbytes: int, to_host: bool) -> _Buffer:
    name = "reads" if to_host else "writes"
    buffer = getattr(_local, name)
    if buffer is None or buffer.nbytes < nbytes:
        size = max(_FIRST_BYTES, buffer.nbytes if buffer else 0)
        while size < nbytes:
            size *= 2
        old, buffer = buffer, _Buffer(_driver, size)
        setattr(_local, name, buffer)
        if old is not None and old.host:  # every use of a thread's buffer was evaluated before it returned
            _driver.host_free(old.host)
    return buffer


def fits(nbytes: int) -> bool:
    """Whether a transfer of ``nbytes`` goes through the pinned buffers (when :func:`available`)."""
    return nbytes <= MAX_BYTES


def _read_into(buffer: _Buffer, words: mx.array, states=()) -> np.ndarray:
    n = words.size
    if buffer.address is None:  # emulated: what a view kept from an earlier read shows is NaN now, or these
        mx.eval(words, states)
        buffer.words.fill(_POISON)
        buffer.words[:n] = np.frombuffer(memoryview(words), np.uint32)
        return buffer.words[:n]
    mx.eval(copy_to(buffer, words), states)
    return buffer.words[:n]


def copy_to(buffer: _Buffer, words: mx.array) -> mx.array:
    """The kernel that copies the 1-D uint32 ``words`` into the start of
    ``buffer`` (a :func:`pinned` one), not evaluated: its (1,) output is done
    when they are there."""
    n = words.size
    return _kernel(True)(inputs=[words, buffer.address], output_shapes=[(1,)], output_dtypes=[mx.uint32],
                         grid=(max(n, 1), 1, 1), threadgroup=(_THREADS, 1, 1))[0]


def on_cuda() -> bool:
    """Whether the pinned path is the real one (MLX's CUDA backend), not off or emulated."""
    return available() and isinstance(_driver, _Driver)


def pinned(nbytes: int) -> _Buffer:
    """A page-locked buffer of its own (whole 32-bit words; kept for the
    process's life), for callers with kernels of their own. CUDA only (:func:`on_cuda`)."""
    return _Buffer(_driver, -(-nbytes // 4) * 4)


def _write_from(buffer: _Buffer, words: np.ndarray) -> mx.array:
    n = words.size
    buffer.words[:n] = words
    if buffer.address is None:  # emulated
        out = mx.array(buffer.words[:n])
        mx.eval(out)
        return out
    out = _kernel(False)(inputs=[mx.array(n, dtype=mx.uint32), buffer.address], output_shapes=[(n,)],
                         output_dtypes=[mx.uint32], grid=(max(n, 1), 1, 1), threadgroup=(_THREADS, 1, 1))[0]
    mx.eval(out)  # the buffer is free again once this returns
    return out


def read(words: mx.array, states=()) -> np.ndarray:
    """A 1-D uint32 array (evaluated or not) on the host, evaluated with
    ``states``: a view of this thread's buffer (see the module's rule).
    Call only when :func:`available`."""
    return _read_into(_buffer(words.size * 4, True), words, states)


def write(values: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """Host ``values`` (their bytes whole 32-bit words) as an evaluated
    ``mx.array`` of ``dtype`` and their shape. Call only when :func:`available`."""
    words = np.ascontiguousarray(values).reshape(-1).view(np.uint32)
    return _write_from(_buffer(words.size * 4, False), words).view(dtype).reshape(values.shape)
