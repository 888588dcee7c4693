"""A span of whole decoder layers on a node, and the KV caches kept for it.

The KV layout and the decode steps built ahead are described in
``stages.py``, which holds the spans (``StageStore``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache, KVCache

from expertmesh import wire
from expertmesh.errors import InvalidRequestError, RequestTooLargeError
from expertmesh.models import Adapter
from expertmesh.nodes import prelaunch
from expertmesh.nodes.routing import SpanRouting
from expertmesh.staging import Staging
from expertmesh.v1 import expertmesh_pb2 as pb

# sequences whose KV one span keeps at most: routers release theirs as they
# finish (and the idle timeout frees what a router forgot), so only a client
# that opens sequences without end reaches it
MAX_SEQUENCES = 1024


class _Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = layers


@dataclass
class _Next:
    """A decode step's graph built ahead of its request (``_Span.prebuild``)."""

    sequences: tuple[int, ...]
    code: int            # the wire dtype of the input it expects
    view: np.ndarray     # the placeholder input's memory: the request's hidden states go here
    out: mx.array
    states: list
    saved: list[dict]    # each cache's attributes before the graph was built (evaluated): put back by ``_cancel``
    thread: int          # the thread that built it (MLX graphs stay on the thread that made them)
    step: int = 0        # set running behind a gate (``prelaunch``): its step number; 0: only built
    done: mx.array | None = None          # its output's copy into the gate's buffer
    words: tuple[int, int, int] = (0, 0, 0)  # that output's 32-bit words: hidden states, ids; the ids' dtype code


class _Span:
    """Decoder layers ``[start, end)`` and the KV caches kept for them."""

    def __init__(self, start: int, module: _Layers, routing: SpanRouting, adapter: Adapter,
                 counts: prelaunch.Counts | None = None):
        self.layers = module.layers
        self.hidden_size = adapter.hidden_size
        self.routing = routing  # what its gates chose, per request
        self.mask = adapter.attention_mask  # as the family's own model builds it
        self.start, self.end = start, start + len(module.layers)
        self.nbytes = sum(v.nbytes for _, v in tree_flatten(module.parameters()))
        self._batches: dict[tuple[int, ...], list] = {}  # row composition -> one (Batch)KVCache per layer
        self._loose: dict[int, list[KVCache]] = {}                    # sequence -> one cache per layer
        self._used: dict[object, float] = {}                          # batch key or sequence -> last use
        self._last: tuple[tuple[int, ...], int] | None = None  # (rows, wire dtype) of the last request from the wire
        self._next: _Next | None = None
        self._placeholders = Staging(max_arrays=8)
        self._gate = prelaunch.Gate(counts) if prelaunch.available() else None
        self._steady = False  # whether the last wire request was one token a row, no trim, no padding

    def caches(self, sequences: tuple[int, ...]) -> list:
        if sequences in self._batches:
            return self._batches[sequences]
        wanted = set(sequences)
        for key in [k for k in self._batches if wanted.intersection(k)]:
            self._split(key)
        held = len(self._loose) + sum(len(k) for k in self._batches)
        new = sum(s not in self._loose for s in sequences)
        if held + new > MAX_SEQUENCES:
            raise RequestTooLargeError(
                f"layers {self.start}-{self.end - 1} already keep the KV of {held} sequences, and {new} more would "
                f"pass the limit of {MAX_SEQUENCES}: release finished ones first")
        per = [self._loose.pop(s, None) or [KVCache() for _ in self.layers] for s in sequences]
        for s in sequences:
            self._used.pop(s, None)
        # one row runs on its own KVCache: the mask-free path mlx-lm decodes a single stream with
        batch = per[0] if len(per) == 1 else [BatchKVCache.merge([p[i] for p in per]) for i in range(len(self.layers))]
        self._batches[sequences] = batch
        return batch

    def _split(self, key: tuple[int, ...]) -> None:
        batch = self._batches.pop(key)
        self._used.pop(key, None)
        for row, s in enumerate(key):
            self._loose[s] = batch if len(key) == 1 else [KVCache() if c.keys is None else c.extract(row)
                                                          for c in batch]
            self._used[s] = time.monotonic()

    def __call__(self, x: mx.array, sequences: tuple[int, ...], right_padding: list[int],
                 trim: int = 0) -> tuple[np.ndarray, int, np.ndarray | None]:
        """The span's output as the wire carries it (``wire.carrier`` values,
        evaluated and read back) with its wire dtype, and the expert ids its
        gates chose (flat, layer after layer: ``SpanRouting.take`` adds each
        layer's offset; None when it has no MoE block)."""
        self._cancel()
        self.routing.begin()
        if not sequences:  # a one-off forward, no KV kept
            return self._read(self._layers(x, self.mask(x, None), [None] * len(self.layers)), [])
        caches = self.caches(sequences)
        if trim:  # never on a batch: validated
            if trim > caches[0].offset:
                raise InvalidRequestError(f"cannot trim {trim} tokens off a sequence's KV of {caches[0].offset}")
            for c in caches:
                c.trim(trim)
        if right_padding:  # never with one row: nothing pads a batch of one
            for c in caches:
                c.prepare(right_padding=right_padding)
        x = self._layers(x, self.mask(x, caches[0]), caches)
        if right_padding:
            for c in caches:
                c.finalize()
        out = self._read(x, [c.state for c in caches])
        self._used[sequences] = time.monotonic()
        return out

    def wire_step(self, hidden: np.ndarray, code: int, sequences: tuple[int, ...], right_padding: list[int],
                  trim: int = 0) -> tuple[np.ndarray, int, np.ndarray | None]:
        """``__call__`` on hidden states as the wire carries them (``code``'s
        carrier values), through the graph built ahead when it is this step's."""
        nxt, self._next = self._next, None
        ahead = (nxt is not None and nxt.sequences == sequences and nxt.code == code and not trim
                 and not right_padding and nxt.view.shape == hidden.shape and nxt.thread == threading.get_ident())
        out = None
        if ahead and nxt.step:
            out = self._launched(nxt, hidden)  # None: its gate gave up before the request came, run it now
            nxt = None
        elif ahead:
            np.copyto(nxt.view, hidden)
            nxt.saved = []  # the caches' old handles go: their memory is then updated in place, as mlx-lm's is
            out = self._read(nxt.out, nxt.states)  # the gates' ids as prebuild's layers noted them
        if out is not None:
            self._used[sequences] = time.monotonic()
            self._last, self._steady = (sequences, code), True
            return out
        self._next = nxt
        self.halt()  # before any MLX op: this thread's GPU work would wait behind the step's gate
        out = self(wire.to_device(hidden, code), sequences, right_padding, trim)
        self._last = (sequences, code) if sequences else None
        self._steady = hidden.shape[1] == 1 and not trim and not right_padding
        return out

    def prebuild(self, launch: bool = False) -> None:
        """Build the next decode step of the rows the last wire request named
        (one new position each), on a placeholder input; nothing runs yet.
        With ``launch`` (and a gate that has not given up on this span), the
        next step of one row's steady decode (its last request a one-token
        step) on mlx-lm's plain ``KVCache`` is set running behind the gate
        instead (``prelaunch``: on the H200 it paid at one stream and cost at
        8). A speculative verify pass or a trim never follows one."""
        if self._last is None or self._next is not None:
            return
        sequences, code = self._last
        caches = self._batches.get(sequences)
        if caches is None:
            return
        if (launch and self._steady and len(sequences) == 1 and self._gate is not None and self._gate.usable
                and type(caches[0]) is KVCache):  # one row's steady decode: a prompt's next step is its first
            return self._prelaunch(sequences, code, caches)
        array, view = self._placeholders.buffer("next", (len(sequences), 1, self.hidden_size), wire.carrier(code))
        x = array.view(mx.bfloat16) if code == pb.BFLOAT16 else array  # as wire.from_numpy gives it
        saved = [dict(vars(c)) for c in caches]
        for c in caches:  # the step writes into new handles of the same arrays: ``_cancel`` puts the old ones back
            for name in ("keys", "values"):
                if isinstance(getattr(c, name, None), mx.array):
                    setattr(c, name, getattr(c, name).reshape(getattr(c, name).shape))
        out = self._step(x, caches, saved)
        self._next = _Next(sequences, code, view, out, [c.state for c in caches], saved, threading.get_ident())

    def _step(self, x: mx.array, caches: list, saved: list[dict]) -> mx.array:
        """A decode step's graph on ``x``, its routing noted; on failure the caches as ``saved``."""
        self.routing.begin()
        try:
            return self._layers(x, self.mask(x, caches[0]), caches)
        except Exception:
            _put_back(caches, saved)
            raise

    def _prelaunch(self, sequences: tuple[int, ...], code: int, caches: list) -> None:
        """``prebuild``'s step, set running behind the span's gate. The caches'
        arrays are not kept aside (their memory is then updated in place, as
        mlx-lm's is): a step let go keeps them, and gets its other attributes
        (the offsets) put back."""
        B, H = len(sequences), self.hidden_size
        carrier = wire.carrier(code)
        step, words = self._gate.open_input(B * H * carrier.itemsize // 4)
        saved = [{k: v for k, v in vars(c).items() if k not in ("keys", "values")} for c in caches]
        try:
            x = words.view(wire.mlx_dtype(code)).reshape(B, 1, H)
            out = self._step(x, caches, saved)
            ids = self.routing.pending()
            flat = [out.reshape(-1).view(mx.uint32)] + ([] if ids is None else [ids.astype(mx.int32).reshape(-1)
                                                                                   .view(mx.uint32)])
            done = self._gate.output(flat[0] if len(flat) == 1 else mx.concatenate(flat))
            if self._gate.running:
                tic = time.perf_counter()
                mx.async_eval(done, [c.state for c in caches])
                self._gate.launched(time.perf_counter() - tic)
        except BaseException as e:
            self._gate.open(step, None)
            _put_back(caches, saved)
            if isinstance(e, Exception):  # the gate's kernel or memory failed: this span only builds ahead now
                self._gate.usable = False
            raise
        shape = np.broadcast_to(np.zeros((), carrier), (B, 1, H))  # the input's shape, as ``view`` gives it
        self._next = _Next(sequences, code, shape, out, [], saved, threading.get_ident(), step, done,
                           (out.size * out.dtype.size // 4, 0 if ids is None else ids.size, wire.wire_dtype(out.dtype)))

    def _launched(self, nxt: _Next, hidden: np.ndarray) -> tuple[np.ndarray, int, np.ndarray | None] | None:
        """The request's input into the gate, and the step's output (as ``_read``
        gives it, copied out of the gate's buffer); None when the gate had
        given up first (the step then ran on an old input: its offsets are
        put back)."""
        caches = self._batches.get(nxt.sequences, [])
        try:
            self._gate.open(nxt.step, np.ascontiguousarray(hidden))
            mx.eval(nxt.done, [] if self._gate.running else [c.state for c in caches])
            went = self._gate.went(nxt.step)
        except BaseException:
            _put_back(caches, nxt.saved)
            raise
        if not went:
            _put_back(caches, nxt.saved)
            return None
        hidden_words, id_count, out_code = nxt.words
        host = np.array(self._gate.result(hidden_words + id_count))
        out = host[:hidden_words].view(wire.carrier(out_code)).reshape(nxt.view.shape)
        return out, out_code, (host[hidden_words:].view(np.int32) if nxt.words[1] else None)

    @property
    def launched(self) -> bool:
        """Whether a step is set running ahead (read without a lock: a hint)."""
        nxt = self._next
        return nxt is not None and nxt.step > 0

    def halt(self) -> None:
        """Let a step set running ahead go (``prelaunch``): nothing else runs
        on the GPU before it. A step only built stays, for its request."""
        if self.launched:
            self._cancel()

    def _cancel(self) -> None:
        """Drop the graph built ahead, its caches as they were before it: the
        step wrote into other handles of their arrays (``mx.array.__setitem__``
        changes the handle it is called on), so the old ones hold what they
        held, evaluated, and any thread may go on from them."""
        nxt, self._next = self._next, None
        if nxt is not None and nxt.step:
            self._gate.open(nxt.step, None)  # it runs on the last input; its offsets are put back below
        if nxt is not None and nxt.sequences in self._batches:
            _put_back(self._batches[nxt.sequences], nxt.saved)

    def _layers(self, x: mx.array, mask, caches: list) -> mx.array:
        """The layers' graph on ``x``, evaluated as one: setting each layer
        running as soon as it was built (``mx.async_eval``) measured slower on
        the H200, 2,672 µs a 7-layer decode step against 2,554
        (``benchmarks/requestprof.py``, stage_direct vs stage_direct_serial)."""
        for layer, c in zip(self.layers, caches):
            x = layer(x, mask, c)
        return x

    def _read(self, x: mx.array, states: list) -> tuple[np.ndarray, int, np.ndarray | None]:
        """Evaluate ``x`` (with ``states``) and read it and the chosen ids back
        in one host read (``wire.read_back``)."""
        ids = self.routing.pending()
        out = wire.read_back([x] if ids is None else [x, ids], states)
        return out[0].reshape(x.shape), wire.wire_dtype(x.dtype), (None if ids is None else out[1])

    def release(self, sequences: set[int]) -> None:
        if self._next is not None and sequences.intersection(self._next.sequences):
            self._cancel()
        for key in [k for k in self._batches if sequences.intersection(k)]:
            self._split(key)
        for s in sequences:
            self._loose.pop(s, None)
            self._used.pop(s, None)

    def expire(self, before: float) -> None:
        """Drop the caches last used before ``before`` (no MLX op: any thread may do it)."""
        for key, used in list(self._used.items()):
            if used < before:
                del self._used[key]
                if self._next is not None and key == self._next.sequences:
                    if self._next.step:
                        self._gate.open(self._next.step, None)  # a host write: its GPU work goes on
                    self._next = None
                if isinstance(key, tuple):
                    del self._batches[key]
                else:
                    del self._loose[key]

    @property
    def kv_bytes(self) -> int:
        caches = [c for b in self._batches.values() for c in b] + [c for p in self._loose.values() for c in p]
        return sum(c.nbytes for c in caches)

    @property
    def sequences(self) -> set[int]:
        return set(self._loose).union(*self._batches) if self._batches else set(self._loose)


def _put_back(caches: list, saved: list[dict]) -> None:
    """Each cache's attributes as ``saved`` before a step was built on it."""
    for c, attrs in zip(caches, saved):
        vars(c).update(attrs)
