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

import inspect
import itertools
import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..errors import ExpertmeshError, UnavailableError
from ..mlxlm import swap_class
from ..v1 import expertmesh_pb2 as pb
from .chain import run_chain
from .link import _REQUEST_IDS, NodeLink, release_request
from .stagecache import StageCache, _Inside
from .stats import RoutingStats

logger = logging.getLogger(__name__)


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
                 relocate: Relocate | None = None, stats: RoutingStats | None = None, prefill_chunk: int | None = None):
        self.stages = [Stage(a, b) for a, b in sorted(spans)]
        self.prefill_chunk = prefill_chunk  # a prompt's tokens a row per chunk of a chain (0: none; None: chain.py's rule)
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
        self._pass_caches: list | None = None        # the cache list of the forward pass under way
        self._chains: dict[Stage, list[Stage]] = {}  # first span -> the spans that follow it layer after layer
        self._ran: set[Stage] = set()                # spans a chain ran in the pass under way
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
        at = _cache_argument(base)
        self._chains = _chains(self.stages) if at is not None else {}

        class Tapped(base):
            def __call__(self, inputs, *args, **kwargs):
                if runtime._rebuilding:  # a rebuild inside a pass: the pass's own state stays as it is
                    return base.__call__(self, inputs, *args, **kwargs)
                runtime._inputs = inputs.tolist()
                runtime._pass_caches = kwargs["cache"] if "cache" in kwargs else \
                    args[at] if len(args) > at else None
                runtime._ran.clear()
                try:
                    return base.__call__(self, inputs, *args, **kwargs)
                finally:  # no cache list kept alive past its pass: ``sweep`` releases what none holds
                    runtime._pass_caches = None
                    runtime._ran.clear()

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
        if stage in self._ran:  # the chain of an earlier span ran this one in this pass
            self._ran.discard(stage)
            return x
        if self._rebuilding or stage not in self._chains:  # a span alone: a chain of one
            return run_chain(self, [stage], x, [cache])
        chain, caches = self._chains[stage], self._pass_caches
        out = run_chain(self, chain, x, [cache] + [None if caches is None else caches[s.start] for s in chain[1:]])
        self._ran.update(chain[1:])
        return out

    def prepare(self, cache, B: int, T: int) -> tuple[pb.StageRequest, list]:
        """The next ``T`` tokens of a span's request (its rows' sequences,
        padding and trim), and the cache stand-in's state to evaluate."""
        request, state = pb.StageRequest(), []
        if cache is not None:
            dummy = mx.zeros((B, 1, T, 1), mx.float16)
            cache.update_and_fetch(dummy, dummy)
            state = cache.state  # nothing else reads it: evaluate it, or its graph grows every step
            request.sequences.extend(cache.sequences)
            request.right_padding.extend(cache.take_padding(T))
            request.trim = cache.take_trim()
            self._sent.update(cache.sequences)
        return request, state

    def send(self, stage: Stage, forward, request: pb.StageRequest, B: int, T: int, at: int = 0):
        """The reply to ``forward`` (``request``'s ``T`` tokens a row, from the
        pass's token ``at``), its span moved to a live node when its node
        fails, and counted (``done``)."""
        while True:
            self.restore(stage, request)
            link, pending, t0 = self.submit(stage, forward)
            reply, rtt = self.wait(link, pending, t0)
            if reply is not None:
                break
            self.moved(stage, link)
        self.done(stage, link, pending, request, reply, rtt, B, T, at)
        return reply

    def lost(self, requests: list[pb.StageRequest]) -> bool:
        """Whether a sequence of these requests lost its KV with a node (``restore`` rebuilds it)."""
        return not self._rebuilding and any(s in self._lost for r in requests for s in r.sequences)

    def moved(self, stage: Stage, dead: NodeLink) -> None:
        """``_move`` the span off ``dead``, unless a rebuild has moved it already."""
        if self.locate(stage.start) is dead:
            self._move(stage, dead)

    def restore(self, stage: Stage, request: pb.StageRequest) -> None:
        """Rebuild, on the span's node, the KV of the rows' sequences lost with a node."""
        if not self._rebuilding:
            for s in request.sequences:
                if s in self._lost:
                    self._rebuild(stage, s)

    def submit(self, stage: Stage, forward):
        """(link, pending reply or the ``UnavailableError`` sending raised, the time it went)."""
        link = self.locate(stage.start)
        forward.request_id = next(_REQUEST_IDS)
        t0 = time.perf_counter()
        try:
            return link, link.submit(forward), t0
        except UnavailableError as e:
            return link, e, t0

    def wait(self, link: NodeLink, pending, t0: float):
        """(reply, round trip); (None, 0) when the node failed and its span can move."""
        try:
            if isinstance(pending, UnavailableError):
                raise pending
            if link.down and self.relocate is not None:  # failed while an earlier reply was read: no second wait
                return None, 0.0
            reply = pending.result(timeout=self.timeout)
            return reply, time.perf_counter() - t0
        except UnavailableError:
            if not link.down or self.relocate is None:  # the node itself refused: no failover helps
                raise
            return None, 0.0

    def done(self, stage: Stage, link: NodeLink, pending, request: pb.StageRequest, reply, rtt: float,
             B: int, T: int, at: int) -> None:
        if self.stats is not None:
            self.stats.record_stage(link.name, stage.start, stage.end, B * T, reply.routing,
                                    pending.sent_bytes, pending.received_bytes, rtt)
        if not self._rebuilding:
            self._record(stage, request, T, at)

    def _record(self, stage: Stage, request: pb.StageRequest, T: int, at: int = 0) -> None:
        """Note the tokens whose KV the node now holds for each row's sequence."""
        for row, s in enumerate(request.sequences):
            tokens = self._history.setdefault(s, [])
            self._span_of[s] = stage
            if request.trim:
                del tokens[len(tokens) - request.trim:]
            pad = request.right_padding[row] if request.right_padding else 0
            tokens.extend(self._inputs[row][at:at + T - pad])

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
        return link.submit(request).result(timeout=self.timeout)

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


def _chains(stages: list[Stage]) -> dict[Stage, list[Stage]]:
    """First span of each run of spans that follow each other layer after
    layer (two or more) -> that run: a chain (``chain.run_chain``)."""
    runs: list[list[Stage]] = []
    for stage in stages:
        if runs and runs[-1][-1].end == stage.start:
            runs[-1].append(stage)
        else:
            runs.append([stage])
    return {run[0]: run for run in runs if len(run) > 1}


def _cache_argument(model_class) -> int | None:
    """Position of ``cache`` among the model's call arguments after the
    inputs; None when it takes none (no chains then: the spans' caches are
    not known before each span is reached)."""
    names = list(inspect.signature(model_class.__call__).parameters)[2:]
    return names.index("cache") if "cache" in names else None
