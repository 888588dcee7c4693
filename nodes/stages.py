"""StageStore: spans of whole decoder layers a node runs end to end.

A pipeline stage saves the per-layer round trips of expert mode: the router
sends a batch's hidden states once per span and gets them back once. The
node keeps each sequence's KV cache for its layers, keyed by the sequence id
the router gives it, until the router releases it or it sits idle too long.

KV layout: the sequences of the last batch a request named stay merged in
mlx-lm ``BatchKVCache``s; when a request names another row composition, the
batches holding any of its sequences are split back into per-sequence
``KVCache``s (``extract``) and the new rows merged (``BatchKVCache.merge``),
so steady decoding of the same batch never copies its cache.

Decode steps built ahead: once a span has answered a request over the data
plane, its connection's thread builds the graph of the same rows' next
decode step right away (``prebuild``), on a placeholder input, while the
node would otherwise wait for it. When that step comes, its hidden states
are written into the placeholder's memory and the graph runs as built; any
other request first puts the caches back as they were (``_cancel``). A
span's graph is Python work the GPU waits for: on the H200 a 7-layer
span's decode step took 2,672 µs built at the request against 1,693 µs a
step for mlx-lm's layers run back to back (benchmarks/README.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache, KVCache
from mlx_lm.utils import infer_quant_config

from expertmesh import compiled, fused, wire
from expertmesh.checkpoint import Checkpoint
from expertmesh.errors import InvalidRequestError, RequestTooLargeError
from expertmesh.models import Adapter
from expertmesh.models.base import PROJECTIONS, eval_private_arrays
from expertmesh.nodes.routing import SpanRouting
from expertmesh.nodes.store import ExpertStore
from expertmesh.staging import Staging
from expertmesh.v1 import expertmesh_pb2 as pb

logger = logging.getLogger(__name__)

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
    ids: mx.array | None
    states: list
    saved: list[dict]    # each cache's attributes before the graph was built (evaluated): put back by ``_cancel``
    thread: int          # the thread that built it (MLX graphs stay on the thread that made them)


class _Span:
    """Decoder layers ``[start, end)`` and the KV caches kept for them."""

    def __init__(self, start: int, module: _Layers, routing: SpanRouting, adapter: Adapter):
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
        if (nxt is not None and nxt.sequences == sequences and nxt.code == code and not trim and not right_padding
                and nxt.view.shape == hidden.shape and nxt.thread == threading.get_ident()):
            np.copyto(nxt.view, hidden)
            nxt.saved = []  # the caches' old handles go: their memory is then updated in place, as mlx-lm's is
            out = wire.read_back([nxt.out] if nxt.ids is None else [nxt.out, nxt.ids], nxt.states)
            self._used[sequences] = time.monotonic()
            self._last = (sequences, code)
            return out[0].reshape(nxt.out.shape), wire.wire_dtype(nxt.out.dtype), (None if nxt.ids is None else out[1])
        self._next = nxt
        out = self(wire.from_numpy(hidden, code), sequences, right_padding, trim)
        self._last = (sequences, code) if sequences else None
        return out

    def prebuild(self) -> None:
        """Build the next decode step of the rows the last wire request named
        (one new position each), on a placeholder input; nothing runs yet."""
        if self._last is None or self._next is not None:
            return
        sequences, code = self._last
        caches = self._batches.get(sequences)
        if caches is None:
            return
        array, view = self._placeholders.buffer("next", (len(sequences), 1, self.hidden_size), wire.carrier(code))
        x = array.view(mx.bfloat16) if code == pb.BFLOAT16 else array  # as wire.from_numpy gives it
        saved = [dict(vars(c)) for c in caches]
        for c in caches:  # the step writes into new handles of the same arrays: ``_cancel`` puts the old ones back
            for name in ("keys", "values"):
                if isinstance(getattr(c, name, None), mx.array):
                    setattr(c, name, getattr(c, name).reshape(getattr(c, name).shape))
        self.routing.begin()
        try:
            out = self._layers(x, self.mask(x, caches[0]), caches)
        except Exception:
            for c, attrs in zip(caches, saved):
                vars(c).update(attrs)
            raise
        self._next = _Next(sequences, code, view, out, self.routing.pending(), [c.state for c in caches], saved,
                           threading.get_ident())

    def _cancel(self) -> None:
        """Drop the graph built ahead, its caches as they were before it: the
        step wrote into other handles of their arrays (``mx.array.__setitem__``
        changes the handle it is called on), so the old ones hold what they
        held, evaluated, and any thread may go on from them."""
        nxt, self._next = self._next, None
        if nxt is not None and self._batches.get(nxt.sequences) is not None:
            for c, attrs in zip(self._batches[nxt.sequences], nxt.saved):
                vars(c).update(attrs)

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


@dataclass
class StageStore:
    """The spans this node holds, by first layer; thread-safe.

    ``idle_timeout``: seconds a sequence's KV may sit unused before it is freed.
    ``prebuild_steps``: see :meth:`prebuild`.
    """

    store: ExpertStore
    idle_timeout: float = 300.0
    spans: dict[int, _Span] = field(default_factory=dict)
    prebuild_steps: bool = True  # build each decode step's graph ahead of its request (off: for A/B measurements)

    def __post_init__(self):
        self._lock = threading.Condition()
        self._usage = (0, 0)  # (KV bytes, sequences) when last counted
        self._closed = False
        self._sweeper = threading.Thread(target=self._sweep, name="stage-kv-sweeper", daemon=True)
        self._sweeper.start()

    @property
    def checkpoint(self) -> Checkpoint:
        return self.store.checkpoint

    @property
    def adapter(self) -> Adapter:
        return self.store.adapter

    # --- loading -------------------------------------------------------------
    def validate(self, spans: list[tuple[int, int]]) -> None:
        n = self.adapter.args.num_hidden_layers
        for start, end in spans:
            if not 0 <= start < end <= n:
                raise InvalidRequestError(f"layer span [{start}, {end}) is not within the model's {n} layers")
        ordered = sorted(spans)
        if any(a[1] > b[0] for a, b in zip(ordered, ordered[1:])):
            raise InvalidRequestError(f"layer spans overlap: {ordered}")

    def span_bytes(self, spans: list[tuple[int, int]]) -> int:
        return self.adapter.span_bytes(self.checkpoint.tensors, spans)

    def assign(self, spans: list[tuple[int, int]], progress: Callable[[int, int, int], None] | None = None) -> None:
        """Hold exactly ``spans`` afterwards (unchanged spans keep their KV);
        ``progress(bytes, total bytes, layers)`` hears each layer read."""
        self.validate(spans)
        kept = {a for a, b in spans if a in self.spans and self.spans[a].end == b}
        todo = [(a, b) for a, b in spans if a not in kept]
        total, done = self.span_bytes(todo), [0, 0]

        def layer_read(layer: int) -> None:
            done[0] += self.adapter.layer_bytes(self.checkpoint.tensors, layer)
            done[1] += 1
            if progress:
                progress(done[0], total, done[1])
        if progress:
            progress(0, total, 0)
        fresh = {a: self.spans[a] if a in kept else self.load(a, b, layer_read) for a, b in spans}
        with self._lock:
            self.spans = fresh
            self._lock.notify_all()
        logger.info("holding %d stage spans (%.1f MB)", len(fresh), self.nbytes / 1e6)

    def load(self, start: int, end: int, layer_read: Callable[[int], None] = lambda layer: None) -> _Span:
        """Build layers ``[start, end)`` with mlx-lm's classes from their bytes
        only (``layer_read(layer)`` after each layer's bytes are read)."""
        model = self.adapter.model_class(self.adapter.args)  # parameters stay lazy: never materialised
        ck, prefix = self.checkpoint, "model.layers."
        dense = [n for n in ck.tensors if any(n.startswith(f"{prefix}{l}.") for l in range(start, end))
                 and not self.adapter.is_expert_weight(n)]
        experts = list(range(self.adapter.num_experts))
        moe = [l for l in range(start, end) if self.adapter.is_moe_layer(l)]
        ck.prefetch([(n, None) for n in dense] + [r for l in moe for r in self.store.reads(l, experts)])
        weights = {}
        for layer in range(start, end):  # layer by layer, as mlx-lm's names sort
            weights.update((n, ck.read(n)) for n in dense if n.startswith(f"{prefix}{layer}."))
            if self.adapter.is_moe_layer(layer):
                for proj in PROJECTIONS:
                    for part, value in self.store._read_proj(layer, proj, experts).items():
                        weights[f"{self.adapter.stacked_path(layer, proj)}.{part}"] = value
            layer_read(layer)
        if hasattr(model, "sanitize"):  # family fix-ups; experts are stacked already
            weights = model.sanitize(weights)
        module = _Layers(list(model.layers[start:end]))
        del model
        local = {f"layers.{int(n.split('.')[2]) - start}.{n.split('.', 3)[3]}": v for n, v in weights.items()}
        quant = self.checkpoint.config.get("quantization") or {}

        def quantized(path: str, module: nn.Module):
            full = f"{prefix}{int(path.split('.')[1]) + start}.{path.split('.', 2)[2]}"
            if full in quant:
                return quant[full]
            if not hasattr(module, "to_quantized") or f"{path}.scales" not in local:
                return False
            return infer_quant_config(path, module, local)

        if quant:
            nn.quantize(module, group_size=quant.get("group_size", 64), bits=quant.get("bits", 4),
                        mode=quant.get("mode", "affine"), class_predicate=quantized)
        module.load_weights(list(local.items()), strict=True)
        module.eval()
        mx.eval(module.parameters())
        eval_private_arrays(module)
        for layer in module.layers:  # gate and up in one gathered matmul
            block = getattr(layer, self.adapter.block_attr)
            if hasattr(block, "switch_mlp"):
                block.switch_mlp = fused.fuse(block.switch_mlp)
        compiled.compile_decode_steps(module)  # norms and RoPEs
        routing = SpanRouting(module.layers, start, self.adapter)  # and the MoE (or MLP) blocks, counted
        return _Span(start, module, routing, self.adapter)

    def measure(self, layer: int, context: int = 32, repeats: int = 5) -> tuple[float, float, int]:
        """Seconds of one decode step of ``layer`` at batch 1 and 8 (medians
        over ``repeats``, after ``context`` tokens of prefill), and its bytes.
        The layer is loaded for this and dropped afterwards."""
        self.validate([(layer, layer + 1)])
        span = self.load(layer, layer + 1)
        dtype = next(v.dtype for _, v in tree_flatten(span.layers[0].parameters())
                     if mx.issubdtype(v.dtype, mx.floating))
        H, times = self.adapter.hidden_size, []
        for B in (1, 8):
            rows = tuple(range(B))
            span(mx.random.normal((B, context, H)).astype(dtype), rows, [])
            steps = []
            for _ in range(repeats + 1):
                x = mx.random.normal((B, 1, H)).astype(dtype)
                mx.eval(x)
                tic = time.perf_counter()
                span(x, rows, [])
                steps.append(time.perf_counter() - tic)
            times.append(sorted(steps[1:])[repeats // 2])
        return times[0], times[1], span.nbytes

    # --- serving -------------------------------------------------------------
    def forward(self, start: int, hidden: "mx.array | np.ndarray", sequences: list[int], right_padding: list[int],
                trim: int = 0, code: int | None = None) -> tuple[np.ndarray, int, pb.StageRouting]:
        """Run the span starting at ``start`` on ``hidden`` [B, T, H] (evaluated;
        with ``code``, that wire dtype's carrier values as a request brings
        them), first dropping ``trim`` tokens off the end of the one sequence's
        KV; its output [B, T, H] as the wire carries it (``wire.carrier``
        values) with its wire dtype, and what its gates routed.

        Raises:
            InvalidRequestError: no such span, or rows that do not fit ``hidden``.
        """
        span = self.spans.get(start)
        if span is None:
            raise InvalidRequestError(f"no stage span starting at layer {start} is held by this node")
        if hidden.ndim != 3 or hidden.shape[2] != self.adapter.hidden_size or 0 in hidden.shape:
            raise InvalidRequestError(f"stage hidden has shape {list(hidden.shape)}, expected [B, T, "
                                      f"{self.adapter.hidden_size}] with B, T > 0")
        B, T, _ = hidden.shape
        if sequences and len(sequences) != B:
            raise InvalidRequestError(f"{len(sequences)} sequence ids for {B} batch rows")
        if len(set(sequences)) != len(sequences):
            raise InvalidRequestError("a sequence id appears in two rows")
        if right_padding and (len(right_padding) != B or not all(0 <= p <= T for p in right_padding)):
            raise InvalidRequestError(f"right_padding needs {B} values in [0, {T}]")
        if any(right_padding) and B == 1:
            raise InvalidRequestError("right_padding on a batch of one row: there is nothing to pad against")
        if trim and (B != 1 or not sequences or trim < 0):
            raise InvalidRequestError("trim needs a positive count and one row with its sequence id")
        padding = list(right_padding) if any(right_padding) else []
        with self._lock:
            if code is None:
                out, code, ids = span(hidden, tuple(sequences), padding, trim)
            else:
                out, code, ids = span.wire_step(hidden, code, tuple(sequences), padding, trim)
            self._lock.notify_all()
            return out, code, span.routing.take(ids)

    def prebuild(self, start: int) -> None:
        """Build ahead the next decode step of the span starting at ``start``,
        for the rows its last request from the wire named (see the module's
        docstring); on the thread that will serve that step. Nothing when
        ``prebuild`` is off, or that span is gone."""
        if not self.prebuild_steps:
            return
        with self._lock:
            span = self.spans.get(start)
            if span is not None:
                span.prebuild()

    def release(self, sequences) -> None:
        """Free these sequences' KV caches (unknown ids are ignored)."""
        gone = set(sequences)
        with self._lock:
            for span in self.spans.values():
                span.release(gone)
            self._lock.notify_all()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.spans.values())

    @property
    def kv_bytes(self) -> int:
        with self._lock:
            return sum(s.kv_bytes for s in self.spans.values())

    @property
    def sequences(self) -> set[int]:
        with self._lock:
            return set().union(*(s.sequences for s in self.spans.values()))

    def usage(self) -> tuple[int, int]:
        """(KV bytes, sequences) held now, or, while a span computes, as last
        counted: GetInfo and metrics never wait for a computation."""
        if self._lock.acquire(blocking=False):
            try:
                spans = self.spans.values()
                self._usage = (sum(s.kv_bytes for s in spans), len(set().union(*(s.sequences for s in spans))))
            finally:
                self._lock.release()
        return self._usage

    def wait_sequences(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate(set of sequence ids held)`` holds; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: predicate(set().union(*(s.sequences for s in self.spans.values()))), timeout)

    def _sweep(self) -> None:
        with self._lock:
            while not self._closed:
                self._lock.wait(timeout=min(self.idle_timeout, 1.0))
                before = time.monotonic() - self.idle_timeout
                for span in self.spans.values():
                    span.expire(before)
                self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._sweeper.join(timeout=5)

