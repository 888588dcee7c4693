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

On MLX's CUDA backend, a node holding one span also sets one row's next
step running behind a gate in pinned memory (``prelaunch.py``), so that its
kernels are launched before the request comes. MLX gives each thread its
own stream, and the thread's later GPU work would wait behind the gate: the
span lets such a step go before any other work of its own, and the node's
other work (expert requests, loading) lets every one go first (``halt``).
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
from mlx_lm.utils import infer_quant_config

from expertmesh import compiled, fused
from expertmesh.checkpoint import Checkpoint
from expertmesh.errors import InvalidRequestError
from expertmesh.models import Adapter
from expertmesh.models.base import PROJECTIONS, eval_private_arrays
from expertmesh.nodes import prelaunch
from expertmesh.nodes.routing import SpanRouting
from expertmesh.nodes.span import MAX_SEQUENCES, _Layers, _Span
from expertmesh.nodes.store import ExpertStore
from expertmesh.v1 import expertmesh_pb2 as pb

__all__ = ["MAX_SEQUENCES", "StageStore"]

logger = logging.getLogger(__name__)


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
    prelaunch_steps: bool = False  # and set it running behind a gate where it can (CUDA; NodeConfig.prelaunch)

    def __post_init__(self):
        self._lock = threading.Condition()
        self._usage = (0, 0)  # (KV bytes, sequences) when last counted
        self.prelaunch_counts = prelaunch.Counts()  # its spans' steps set running, whatever spans it holds
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
        self.halt()  # loading runs on the GPU: not behind a step waiting for its request
        fresh = {a: self.spans[a] if a in kept else self.load(a, b, layer_read) for a, b in spans}
        with self._lock:
            self.halt()
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
        return _Span(start, module, routing, self.adapter, self.prelaunch_counts)

    def measure(self, layer: int, context: int = 32, repeats: int = 5) -> tuple[float, float, int]:
        """Seconds of one decode step of ``layer`` at batch 1 and 8 (medians
        over ``repeats``, after ``context`` tokens of prefill), and its bytes.
        The layer is loaded for this and dropped afterwards."""
        self.validate([(layer, layer + 1)])
        self.halt()
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
        with self._lock:  # no other span has a step set running: that is done only where there is one span
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
            if span is not None:  # set running only where nothing else would wait behind it
                span.prebuild(launch=self.prelaunch_steps and len(self.spans) == 1)

    def halt(self) -> None:
        """Let every step set running ahead go (see the module's docstring),
        before other GPU work; no MLX op, so any thread may call it."""
        if not any(span.launched for span in list(self.spans.values())):
            return  # nothing set running: no wait for the lock, held while a span computes
        with self._lock:
            for span in self.spans.values():
                span.halt()

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

