"""Scheduler: continuous batching with mlx-lm's ``BatchGenerator``.

Every decode step of every active sequence is one forward pass, so
concurrent requests share one message per node per MoE layer. The loop runs
on the engine's MLX worker while any sequence is active.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, make_stop_sequences

from ..worker import MLXWorker

logger = logging.getLogger(__name__)


@dataclass
class Piece:
    text: str
    token: int
    finish_reason: str | None
    prompt_tokens: int
    generation_tokens: int
    generation_tps: float


@dataclass
class Request:
    tokens: list[int]
    max_tokens: int
    sampler: Callable | None = None
    logits_processors: list = field(default_factory=list)
    stop_words: list[str] = field(default_factory=list)
    seed: int | None = None  # reseeds mlx's global generator on admission
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Piece | Exception | None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Active:
    request: Request
    detokenizer: object
    count: int = 0
    tic: float = 0.0


class Scheduler:
    def __init__(self, model, tokenizer, worker: MLXWorker, max_batch: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.worker = worker
        self.max_batch = max_batch
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._generator: BatchGenerator | None = None
        self.steps = 0  # forward passes run, for tests and stats

    def submit(self, request: Request) -> None:
        with self._lock:
            self._incoming.put(request)
            if not self._running:
                self._running = True
                self.worker.submit(self._loop)

    def _loop(self) -> None:
        if self._generator is None:
            self._generator = BatchGenerator(self.model, completion_batch_size=self.max_batch,
                                             prefill_batch_size=min(8, self.max_batch))
        gen, active = self._generator, {}
        try:
            while True:
                self._admit(gen, active)
                gone = [uid for uid, a in active.items() if a.request.cancelled.is_set()]
                if gone:
                    gen.remove(gone)
                    for uid in gone:
                        active.pop(uid).request.pieces.put(None)
                with self._lock:
                    if not active and self._incoming.empty():
                        self._running = False
                        return
                if not active:
                    continue
                _, responses = gen.next()
                self.steps += 1
                for r in responses:
                    self._emit(active, r)
        except Exception as e:  # a node went down, ...: every waiting request hears it
            logger.warning("generation failed: %s", e)
            for a in active.values():
                a.request.pieces.put(e)
            gen.remove(list(active))
            self._generator = None  # its caches may be half-updated
            with self._lock:
                self._running = False
                if not self._incoming.empty():
                    self._running = True
                    self.worker.submit(self._loop)

    def _admit(self, gen: BatchGenerator, active: dict) -> None:
        while len(active) < self.max_batch:
            try:
                req = self._incoming.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                req.pieces.put(None)
                continue
            if req.seed is not None:
                mx.random.seed(req.seed)
            stop = make_stop_sequences(self.tokenizer, req.stop_words)
            (uid,) = gen.insert([req.tokens], max_tokens=[req.max_tokens], samplers=[req.sampler],
                                logits_processors=[req.logits_processors], stop_sequences=[stop])
            active[uid] = _Active(req, copy.deepcopy(self.tokenizer.detokenizer), tic=time.perf_counter())

    def _emit(self, active: dict, r) -> None:
        a = active[r.uid]
        if a.count == 0:
            a.tic = time.perf_counter()  # decode speed counts from the first token, as mlx-lm does
        a.count += 1
        eos = r.token in self.tokenizer.eos_token_ids
        if not eos:
            a.detokenizer.add_token(r.token)
        if r.finish_reason:
            a.detokenizer.finalize()
        elapsed = time.perf_counter() - a.tic
        a.request.pieces.put(Piece(a.detokenizer.last_segment, r.token, r.finish_reason,
                                   len(a.request.tokens), a.count, a.count / elapsed if elapsed > 0 else 0.0))
        if r.finish_reason:
            del active[r.uid]
            a.request.pieces.put(None)
