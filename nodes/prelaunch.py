"""A span's next decode step set running before its request comes, on MLX's CUDA backend.

When a node evaluates a decode step as its request arrives, MLX's CUDA
backend encodes and launches each of the span's kernels while the router
waits for the reply. Built ahead (``_Span.prebuild``), the graph is ready,
but its launches are still on the critical path. Here the step is also set
running (``mx.async_eval``) right after the previous reply goes out: its
first kernel is a gate that waits on the GPU until a word in page-locked
host memory says go, then copies the request's hidden states from that
memory. The request writes its input and the word; what the router then
waits for is the GPU's own time, and the output comes back into pinned
memory (``expertmesh.hostcopy``). On the H200 (``benchmarks/prelaunch.py``,
``results/prelaunch-20261202-s11-6.json``) a 6-layer span's step took 1,247
µs this way against 1,854 built ahead and evaluated on arrival; in the mesh
(``results/device-20261202-s11-c-*.json``) the two nodes' own time for a
one-stream token fell from 4,728 to 2,901 µs. At 8 streams it rose instead
(9,115 to 10,530 µs; then a request for other rows waited behind the gate,
fixed since), so only one row's steady decode steps are set running
(``_Span.prebuild``).

A gate that is not opened within ``LIMIT_NS`` gives up and lets the step run
on whatever input is there (its status says so), so that a missed request
stalls the node's GPU work for at most that long. A step that is not wanted
(other rows came, a release, an expired gate) is let go the same way, and
its caches' offsets put back; its one write, at the next position of each
KV cache, is overwritten by the next step there before any step reads it.

Words: ``ctl[0]`` the step the host opens, ``ctl[1]`` the last step that
went, ``ctl[2]`` the last that expired, the input from ``ctl[4]`` on.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
import logging
import platform

import mlx.core as mx
import numpy as np

from expertmesh import hostcopy
from expertmesh.staging import Staging

logger = logging.getLogger(__name__)

LIMIT_NS = 25_000_000  # a gate waits at most this long for its request
GIVE_UPS = 3           # a span whose steps missed this many times in a row stops setting them running:
SLOW_LAUNCH_S = 0.015  # a miss is a gate that gave up, or a step this slow to set running (MLX waited on its gate)
_HEAD = 4              # control words before the input
_THREADS = 256
_STEPS = itertools.count(1)


def _next_step() -> int:
    """The next step number: 32-bit, never 0 (the word a fresh control block holds)."""
    return next(_STEPS) % 0xFFFFFFFF + 1

# one block decides for the whole input (blocks of their own could decide apart), then copies it
_SOURCE = """
    __shared__ unsigned int go;
    volatile unsigned int* ctl = reinterpret_cast<volatile unsigned int*>(
        (static_cast<unsigned long long>(addr[1]) << 32) | addr[0]);
    unsigned int want = step[0];
    if (threadIdx.x == 0) {
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        t = t0;
        // serial-number order: a later step already opened lets this one go at once
        while (static_cast<int>(ctl[0] - want) < 0 && t - t0 < LIMIT) {
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        }
        go = ctl[0] == want;
    }
    __syncthreads();
    __threadfence_system();
    for (unsigned int i = threadIdx.x; i < n[0]; i += blockDim.x) { dst[i] = ctl[HEAD + i]; }
    if (threadIdx.x == 0) { ctl[go ? 1 : 2] = want; }
"""
_kernel = None


def available() -> bool:
    """Whether steps can be set running ahead here: MLX's CUDA backend with
    pinned memory on an x86-64 host (whose stores reach the GPU in program
    order: the input before the word that opens the gate), or
    ``EXPERTMESH_PINNED=emulate`` (``Gate``'s emulation)."""
    return hostcopy.available() and (platform.machine() in ("x86_64", "AMD64") or not hostcopy.on_cuda())


def _gate():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="expertmesh_gate", input_names=["addr", "step", "n"],
                                      output_names=["dst"], source=_SOURCE)
    return _kernel


@dataclass
class Counts:
    """What a node's steps set running came to (``NodeStats.prelaunch_*``)."""

    answered: int = 0  # answered through their gate
    gave_up: int = 0   # the gate gave up before the request came
    let_go: int = 0    # not wanted, let go


class Gate:
    """A span's pinned control block and output buffer, reused step after step.

    Emulated off CUDA (``EXPERTMESH_PINNED=emulate``), for the CPU tests of
    the span's side: the input is a staged placeholder the request writes,
    the step is not set running (``running`` is False) but evaluated at the
    request, and ``give_up`` makes the next gate report it gave up."""

    give_up = False  # tests: the next step's gate reports that it gave up (emulated only)

    def __init__(self, counts: Counts | None = None):
        self.counts = counts or Counts()  # the node's, shared by its spans' gates
        self.running = hostcopy.on_cuda()  # whether steps are set running before their request
        self.usable = True  # False once this span's gates keep giving up, or its launches wait (see went, launched)
        self._ctl = self._out = None
        self._staging = None if self.running else Staging(max_arrays=4)
        self._opened, self._expired, self._misses, self._slow = 0, 0, 0, False

    def open_input(self, words: int) -> tuple[int, mx.array]:
        """(a new step number, the gate's output: ``words`` uint32 of input, once opened)."""
        step = _next_step()
        if not self.running:
            self._ctl = self._staging.buffer("input", (words,), np.uint32)
            self._expired = step if Gate.give_up else 0
            Gate.give_up = False
            return step, self._ctl[0]
        if self._ctl is None or self._ctl.words.size < _HEAD + words:
            self._ctl = hostcopy.pinned(4 * (_HEAD + max(words, 1 << 14)))
        x = _gate()(inputs=[self._ctl.address, mx.array(step, dtype=mx.uint32), mx.array(words, dtype=mx.uint32)],
                    output_shapes=[(words,)], output_dtypes=[mx.uint32], grid=(_THREADS, 1, 1),
                    threadgroup=(_THREADS, 1, 1), template=[("LIMIT", LIMIT_NS), ("HEAD", _HEAD)])[0]
        return step, x

    def output(self, words: mx.array) -> mx.array:
        """The copy of ``words`` (1-D uint32) into the output buffer, not evaluated."""
        if not self.running:
            self._out = words
            return words
        if self._out is None or self._out.words.size < words.size:
            self._out = hostcopy.pinned(4 * max(words.size, 1 << 14))
        return hostcopy.copy_to(self._out, words)

    def open(self, step: int, values: np.ndarray | None) -> None:
        """Let ``step`` go: with ``values`` (their 32-bit words) as its input, or on what is there
        (counted as let go)."""
        if values is None:
            self.counts.let_go += 1
        if not self.running:
            if values is not None and self._expired != step:
                np.copyto(self._ctl[1], values.reshape(-1).view(np.uint32))
            self._opened = step
            return
        ctl = self._ctl.words
        if values is not None:
            words = values.reshape(-1).view(np.uint32)
            ctl[_HEAD:_HEAD + words.size] = words
        ctl[0] = step  # after the input: x86 keeps stores in order, and the gate reads the input after this

    def went(self, step: int) -> bool:
        """Whether ``step`` ran on its request's input (read after it was
        evaluated). ``GIVE_UPS`` misses in a row (gates that gave up, requests
        further apart than ``LIMIT_NS``, or slow launches) make the gate
        unusable; an answered step that was quick to set running resets the
        count. A span's first step set running both compiles the gate's
        kernel (a slow launch) and often waits while the router compiles its
        own first decode step (a give-up): one miss, not a verdict (the H200
        run s12-a stopped every span there, answering none)."""
        went = (self._opened == step and self._expired != step) if not self.running else \
            int(self._ctl.words[1]) == step
        if went:
            self.counts.answered += 1
        else:
            self.counts.gave_up += 1
        missed, self._slow = not went or self._slow, False
        self._misses = self._misses + 1 if missed else 0
        if self._misses >= GIVE_UPS and self.usable:
            self.usable = False
            logger.info("a span's decode steps set running ahead missed %d times in a row (requests more than %d ms "
                        "apart, or launches over %d ms): no longer done ahead", GIVE_UPS, LIMIT_NS // 1_000_000,
                        SLOW_LAUNCH_S * 1e3)
        return went

    def launched(self, seconds: float) -> None:
        """How long setting a step running took: past ``SLOW_LAUNCH_S`` MLX
        waited for its own work (more than ~10 tasks of kernels, which the gate
        holds back) or compiled: that step counts as a miss (``went``)."""
        self._slow = seconds > SLOW_LAUNCH_S

    def result(self, words: int) -> np.ndarray:
        """The output's first ``words``: good until the next step's output lands."""
        if not self.running:
            return np.frombuffer(memoryview(self._out), np.uint32)[:words]
        return self._out.words[:words]
