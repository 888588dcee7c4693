"""The router's cache slot for a stage span: the layout of mlx-lm's caches,
the sequence id of every row, no KV (the span's node keeps that).

``BatchGenerator`` merges, extends, filters, pads and splits per-layer
caches; a span's slot is a ``StageCache`` per sequence and a
``StageBatchCache`` per batch: a real ``KVCache`` / ``BatchKVCache`` over one
zero-width dummy head (so its layout, and the masks built from it, match the
router's other layers) that also carries each row's sequence id, the trim
and right padding its next request tells the node. Layers inside a span
after its first get an ``_Inside``: nothing kept.
"""

from __future__ import annotations

import copy

from mlx_lm.models.cache import BatchKVCache, KVCache

from ..mlxlm import BaseCache


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
