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
"""

from __future__ import annotations

import copy
import itertools
import logging
import secrets
import weakref

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, _BaseCache

from .. import wire
from ..errors import ExpertmeshError, UnavailableError
from ..v1 import expertmesh_pb2 as pb
from .dispatcher import _REQUEST_IDS, NodeLink

logger = logging.getLogger(__name__)


class StageCache(KVCache):
    """One sequence's cache slot for a stage span (what ``make_cache`` gives)."""

    def __init__(self, runtime: "StageRuntime", sequence: int):
        super().__init__()
        self.runtime, self.sequences = runtime, [sequence]
        runtime.track(self)

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


class _Inside(_BaseCache):
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

    @property
    def nbytes(self):
        return 0


class StageBlock(nn.Module):
    """Stands where the first layer of a span was: runs the whole span on its node."""

    def __init__(self, runtime: "StageRuntime", start: int, end: int, link: NodeLink):
        super().__init__()
        self._runtime, self._link = runtime, link
        self.start, self.end = start, end

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        return self._runtime.run(self._link, self.start, x, cache)


class Passthrough(nn.Module):
    """Stands where a later layer of a span was: the span ran already."""

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        return x


class StageRuntime:
    """Runs the stage spans of one router: ``install`` into the model, then
    ``run`` per span and forward pass, ``sweep`` after each batch step."""

    def __init__(self, spans: list[tuple[int, int, NodeLink]], timeout: float):
        self.spans = sorted(spans, key=lambda s: s[0])
        self.timeout = timeout
        self._caches: weakref.WeakSet = weakref.WeakSet()
        self._sent: set[int] = set()
        # ids unique across routers a node may serve in turn
        self._ids = itertools.count(secrets.randbits(40) << 20)

    def track(self, cache) -> None:
        self._caches.add(cache)

    def install(self, model: nn.Module) -> None:
        """Swap each span's layers for stand-ins (dropping their weights here)."""
        make_base = getattr(model, "make_cache", None)
        # the list itself: mlx-lm's ``Model.layers`` may be a slice of it (``pipeline_layers``)
        layers = (model.model if "model" in model else model).layers
        for start, end, link in self.spans:
            layers[start] = StageBlock(self, start, end, link)
            for i in range(start + 1, end):
                layers[i] = Passthrough()

        def make_cache():
            caches = make_base() if make_base else [KVCache() for _ in model.layers]
            for start, end, _ in self.spans:
                caches[start] = StageCache(self, next(self._ids))
                caches[start + 1:end] = [_Inside() for _ in range(start + 1, end)]
            return caches

        model.make_cache = make_cache

    def run(self, link: NodeLink, start: int, x: mx.array, cache) -> mx.array:
        B, T, _ = x.shape
        stage, state = pb.StageRequest(), []
        if cache is not None:
            dummy = mx.zeros((B, 1, T, 1), mx.float16)
            cache.update_and_fetch(dummy, dummy)
            state = cache.state  # nothing else reads it: evaluate here, or its graph grows every step
            stage.sequences.extend(cache.sequences)
            stage.right_padding.extend(cache.take_padding(T))
            self._sent.update(cache.sequences)
        mx.eval(x, state)
        reply = self._call(link, pb.ForwardRequest(request_id=next(_REQUEST_IDS), layer=start,
                                                   hidden=wire.encode(x), stage=stage))
        return wire.decode(reply.output, "output")

    def _call(self, link: NodeLink, request: pb.ForwardRequest) -> pb.ForwardResponse:
        try:
            return link.submit(request).result(timeout=self.timeout)
        except TimeoutError:
            raise UnavailableError(f"{link!r} did not answer its stage within {self.timeout:g}s") from None

    def sweep(self) -> None:
        """Release on the nodes the sequences no cache here holds any more."""
        live = {s for c in list(self._caches) for s in c.sequences}
        gone = self._sent - live
        if not gone:
            return
        self._sent -= gone
        for link in {id(l): l for _, _, l in self.spans}.values():
            try:
                self._call(link, pb.ForwardRequest(request_id=next(_REQUEST_IDS),
                                                   stage=pb.StageRequest(release=sorted(gone))))
            except ExpertmeshError as e:  # the node's idle timeout frees them instead
                logger.warning("could not release %d sequences on %r: %s", len(gone), link, e)
