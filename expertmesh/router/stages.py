"""The router's side of pipeline stages: stand-in layers and proxy caches.

A span of whole decoder layers held by a node becomes, in the router's
model, one ``StageBlock`` (its first layer: sends the hidden states, gets the
span's output back) followed by pass-through layers. Generation still runs
through mlx-lm's ``BatchGenerator``, which merges, extends, filters, pads and
splits per-layer caches; the span's cache slot is a ``StageBatchCache``: a
real ``BatchKVCache`` over one zero-width dummy head (so its layout, and the
masks built from it, match the router's other layers) that also carries the
sequence id of each row. Each stage request names the rows' sequences, and
the node keeps their real KV (nodes/stages.py). Sequences whose caches are
gone from the router are released on the nodes by ``sweep``.

That KV is the only state a node keeps, and the router can rebuild it: it
remembers the tokens each sequence fed each span, and when a span's node
fails, ``relocate`` loads the span onto a live node and every sequence it
served is re-run from its prefix through the new holder before its next step
there; the step under way is then sent again, and the stream goes on.
Speculative decoding trims a single sequence's cache: the trim travels with
the next request.
"""

from __future__ import annotations

import copy
import itertools
import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache

from .. import wire
from ..errors import ExpertmeshError, UnavailableError
from ..mlxlm import BaseCache, swap_class
from ..v1 import expertmesh_pb2 as pb
from .link import _REQUEST_IDS, NodeLink, release_request, stage_request
from .stats import RoutingStats

logger = logging.getLogger(__name__)


class StageCache(KVCache):
    """One sequence's cache slot for a stage span (what ``make_cache`` gives)."""

    def __init__(self, runtime: "StageRuntime", sequence: int | None):
        """``sequence`` None: a one-off forward, the node keeps no KV."""
        super().__init__()
        self.runtime, self.sequences = runtime, [] if sequence is None else [sequence]
        self._trim = 0
        runtime.track(self)

    def trim(self, n: int) -> int:
        n = super().trim(n)
        self._trim += n
        return n

    def take_trim(self) -> int:
        """Tokens trimmed here since the last request: the node drops them too."""
        n, self._trim = self._trim, 0
        return n

    @classmethod
    def merge(cls, caches):
        return StageBatchCache.adopt(BatchKVCache.merge(caches), caches[0].runtime,
                                     [s for c in caches for s in c.sequences])

    def take_padding(self, n: int) -> list[int]:
        return []


class StageBatchCache(BatchKVCache):
    """A batch's cache slot for a stage span: the layout of a ``BatchKVCache``
    plus the sequence id of every row, following every structural change."""

    @classmethod
    def adopt(cls, batch: BatchKVCache, runtime: "StageRuntime", sequences: list[int]) -> "StageBatchCache":
        self = cls.__new__(cls)
        self.__dict__.update(batch.__dict__)
        self.runtime, self.sequences, self._remaining = runtime, list(sequences), None
        runtime.track(self)
        return self

    def __deepcopy__(self, memo):
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update({k: v if k == "runtime" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        new.runtime.track(new)
        return new

    def filter(self, batch_indices):
        super().filter(batch_indices)
        self.sequences = [self.sequences[i] for i in batch_indices]
        if self._remaining is not None:
            self._remaining = [self._remaining[i] for i in batch_indices]

    def extend(self, other):
        super().extend(other)
        self.sequences += other.sequences
        if self._remaining is not None or other._remaining is not None:
            raise RuntimeError("cannot extend a stage cache in the middle of a padded prompt")

    def take_trim(self) -> int:
        return 0  # BatchGenerator never trims

    def extract(self, idx):
        cache = StageCache(self.runtime, self.sequences[idx])
        if self.keys is not None:
            cache.state = super().extract(idx).state
        return cache

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._remaining = list(lengths)

    def finalize(self):
        super().finalize()
        self._remaining = None

    def take_padding(self, n: int) -> list[int]:
        """Pad tokens at the end of each row of the next ``n`` input tokens of
        a right-padded prompt (a long one arrives in several chunks)."""
        if self._remaining is None:
            return []
        real = [min(r, n) for r in self._remaining]
        self._remaining = [r - k for r, k in zip(self._remaining, real)]
        return [n - k for k in real]


class _Inside(BaseCache):
    """Cache slot of a layer inside a span after its first: nothing kept here."""

    @classmethod
    def merge(cls, caches):
        return cls()

    def extend(self, other): pass
    def filter(self, batch_indices): pass
    def prepare(self, **kwargs): pass
    def finalize(self): pass
    def extract(self, idx): return _Inside()
    def empty(self): return True
    def is_trimmable(self): return True
    def trim(self, n): return n

    @property
    def nbytes(self):
        return 0


@dataclass(frozen=True, eq=False)
class Stage:
    """A span of whole layers (the cluster's snapshot says which node runs it now)."""

    start: int
    end: int


# first layer of a span -> the link of the node that runs it now (read from the current snapshot)
Locate = Callable[[int], NodeLink]
# (first layer, end, the node that failed) -> a live node now holding the span (a command of the state's owner)
Relocate = Callable[[int, int, NodeLink], NodeLink]


class StageBlock(nn.Module):
    """Stands where the first layer of a span was: runs the whole span on its node."""

    def __init__(self, runtime: "StageRuntime", stage: Stage):
        super().__init__()
        self._runtime, self._stage = runtime, stage

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        return self._runtime.run(self._stage, x, cache)


class Passthrough(nn.Module):
    """Stands where a later layer of a span was: the span ran already."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        return x


class StageRuntime:
    """Runs the stage spans of one router: ``install`` into the model, then
    ``run`` per span and forward pass, ``sweep`` after each batch step.

    ``locate`` names the node running a span at each step; ``relocate``
    moves a failed node's span (None: a failure is final); ``stats`` counts
    the round trips.
    """

    REBUILD_CHUNK = 512  # prefix tokens per request when rebuilding a sequence's KV

    def __init__(self, spans: list[tuple[int, int]], timeout: float, locate: Locate,
                 relocate: Relocate | None = None, stats: RoutingStats | None = None):
        self.stages = [Stage(a, b) for a, b in sorted(spans)]
        self.locate = locate
        self.timeout = timeout
        self.relocate = relocate
        self.stats = stats
        self._caches: weakref.WeakSet = weakref.WeakSet()
        self._sent: set[int] = set()
        self._history: dict[int, list[int]] = {}  # sequence -> the tokens its span's node holds KV of
        self._span_of: dict[int, Stage] = {}      # sequence -> its span
        self._lost: set[int] = set()              # sequences whose KV died with a node: rebuilt before use
        self._inputs: list[list[int]] | None = None  # token ids of the forward pass under way
        self._rebuilding = False
        self._model: nn.Module | None = None
        # ids unique across routers a node may serve in turn
        self._ids = itertools.count(secrets.randbits(40) << 20)

    def track(self, cache) -> None:
        self._caches.add(cache)

    def install(self, model: nn.Module) -> None:
        """Swap each span's layers for stand-ins (dropping their weights here)
        and have the model tell the token ids of each forward pass."""
        self._model = model
        self._make_base = getattr(model, "make_cache", None)
        # the list itself: mlx-lm's ``Model.layers`` may be a slice of it (``pipeline_layers``)
        layers = (model.model if "model" in model else model).layers
        for stage in self.stages:
            layers[stage.start] = StageBlock(self, stage)
            for i in range(stage.start + 1, stage.end):
                layers[i] = Passthrough()
        model.make_cache = lambda: self._make_caches(lambda stage: StageCache(self, next(self._ids)))
        base, runtime = type(model), self

        class Tapped(base):
            def __call__(self, inputs, *args, **kwargs):
                if not runtime._rebuilding:
                    runtime._inputs = inputs.tolist()
                return base.__call__(self, inputs, *args, **kwargs)

        Tapped.__name__ = Tapped.__qualname__ = base.__name__
        swap_class(model, Tapped)

    def _make_caches(self, stage_cache: Callable[[Stage], KVCache]) -> list:
        model = self._model
        caches = self._make_base() if self._make_base else [KVCache() for _ in model.layers]
        for stage in self.stages:
            caches[stage.start] = stage_cache(stage)
            caches[stage.start + 1:stage.end] = [_Inside() for _ in range(stage.start + 1, stage.end)]
        return caches

    def run(self, stage: Stage, x: mx.array, cache) -> mx.array:
        B, T, _ = x.shape
        request, state = pb.StageRequest(), []
        if cache is not None:
            dummy = mx.zeros((B, 1, T, 1), mx.float16)
            cache.update_and_fetch(dummy, dummy)
            state = cache.state  # nothing else reads it: evaluate here, or its graph grows every step
            request.sequences.extend(cache.sequences)
            request.right_padding.extend(cache.take_padding(T))
            request.trim = cache.take_trim()
            self._sent.update(cache.sequences)
        mx.eval(x, state)
        forward = stage_request(stage.start, x, request.sequences, request.right_padding, request.trim)
        while True:
            if not self._rebuilding:
                for s in request.sequences:
                    if s in self._lost:
                        self._rebuild(stage, s)
            link = self.locate(stage.start)
            forward.request_id = next(_REQUEST_IDS)
            try:
                t0 = time.perf_counter()
                reply, sent, received = self._exchange(link, forward)
                rtt = time.perf_counter() - t0
                break
            except UnavailableError:
                if not link.down or self.relocate is None:  # the node itself refused: no failover helps
                    raise
            self._move(stage, link)
        if self.stats is not None:
            self.stats.record_stage(link.name, stage.start, stage.end, B * T, reply.routing,
                                    sent, received, rtt)
        if not self._rebuilding:
            self._record(stage, request, T)
        return wire.decode(reply.output, "output")  # fresh, as the dispatcher's answers (see there)

    def _record(self, stage: Stage, request: pb.StageRequest, T: int) -> None:
        """Note the tokens whose KV the node now holds for each row's sequence."""
        for row, s in enumerate(request.sequences):
            tokens = self._history.setdefault(s, [])
            self._span_of[s] = stage
            if request.trim:
                del tokens[len(tokens) - request.trim:]
            pad = request.right_padding[row] if request.right_padding else 0
            tokens.extend(self._inputs[row][:T - pad])

    def _move(self, stage: Stage, dead: NodeLink) -> None:
        """Load the span onto a live node; the KV of every sequence it served is lost."""
        link = self.relocate(stage.start, stage.end, dead)
        lost = {s for s, st in self._span_of.items() if st is stage}
        try:  # a node that came back may still hold these sequences' KV: rebuilt KV must not add to it
            self._call(link, release_request(lost))
        except ExpertmeshError as e:
            logger.warning("could not release %d sequences on %r before rebuilding them: %s", len(lost), link, e)
        logger.warning("layers %d-%d moved from %r to %r: rebuilding the KV of %d sequences", stage.start,
                       stage.end - 1, dead, link, len(lost))
        self._lost |= lost

    def _rebuild(self, stage: Stage, sequence: int) -> None:
        """Re-run the sequence's prefix through the model so that the span's new
        node holds its KV again. Other spans keep the prefix's KV under a
        throwaway sequence while it runs in chunks (later chunks attend to
        earlier ones); ``sweep`` releases those once the caches are gone."""
        tokens = self._history.get(sequence, [])
        self._rebuilding = True
        try:
            caches = self._make_caches(lambda st: StageCache(self, sequence if st is stage else next(self._ids)))
            for i in range(0, len(tokens), self.REBUILD_CHUNK):
                self._model(mx.array(tokens[i:i + self.REBUILD_CHUNK])[None], cache=caches)
        finally:
            self._rebuilding = False
        self._lost.discard(sequence)

    def _call(self, link: NodeLink, request: pb.ForwardRequest) -> pb.ForwardResponse:
        return self._exchange(link, request)[0]

    def _exchange(self, link: NodeLink, request: pb.ForwardRequest) -> tuple[pb.ForwardResponse, int, int]:
        """The reply to ``request``, and the bytes of both."""
        pending = link.submit(request)
        reply = pending.result(timeout=self.timeout)
        return reply, pending.sent_bytes, pending.received_bytes

    def sweep(self) -> None:
        """Release on the nodes the sequences no cache here holds any more."""
        live = {s for c in list(self._caches) for s in c.sequences}
        gone = self._sent - live
        if not gone:
            return
        self._sent -= gone
        for s in gone:
            self._history.pop(s, None)
            self._span_of.pop(s, None)
            self._lost.discard(s)
        for link in {id(link): link for link in map(self.locate, (st.start for st in self.stages))}.values():
            try:
                self._call(link, release_request(gone))
            except ExpertmeshError as e:  # the node's idle timeout frees them instead
                logger.warning("could not release %d sequences on %r: %s", len(gone), link, e)
