"""Scheduler: continuous batching with mlx-lm's ``BatchGenerator``.

Every decode step of every active sequence is one forward pass, so
concurrent requests share one message per node per MoE layer. The loop runs
on the engine's MLX worker while any sequence is active. With a draft model,
a greedy request that starts alone is decoded speculatively instead
(speculative.py), in turn with the batch of any that arrive meanwhile.
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
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from ..options import GenerationOptions
from ..worker import MLXWorker
from .speculative import Draft, SpeculativeStream
from .stops import StopStrings

logger = logging.getLogger(__name__)

SPECULATIVE = "speculative"  # the uid of the speculative stream among the active requests


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
    options: GenerationOptions = GenerationOptions()
    pieces: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Piece | Exception | None
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Active:
    request: Request
    detokenizer: object
    stops: StopStrings
    count: int = 0
    tic: float = 0.0


class Scheduler:
    def __init__(self, model, tokenizer, worker: MLXWorker, max_batch: int = 32, draft: Draft | None = None):
        self.model = model
        self.draft = draft
        self.tokenizer = tokenizer
        self.worker = worker
        self.max_batch = max_batch
        self._incoming: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self._generator: BatchGenerator | None = None
        self._speculative: SpeculativeStream | None = None
        self.steps = 0  # steps run (a forward pass each, but a speculative token checked already), for tests
        self.on_step: Callable[[], None] = lambda: None  # after each step: e.g. release finished sequences' KV

    def submit(self, request: Request) -> None:
        with self._lock:
            self._incoming.put(request)
            self._start_locked()

    def kv_cache_bytes(self, timeout: float = 60.0) -> int:
        """Bytes of KV cache held once the running steps are done (the loop
        gives the worker back only when no sequence is left)."""
        return self.worker.submit(lambda: self._generator.prompt_cache_nbytes if self._generator else 0).result(timeout)

    def _start_locked(self) -> None:
        """Run the loop on the worker unless it runs already (hold ``_lock``)."""
        if not self._running and not self._incoming.empty():
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
                    self._remove(gen, gone)
                    for uid in gone:
                        active.pop(uid).request.pieces.put(None)
                    self.on_step()
                with self._lock:
                    if not active and self._incoming.empty():
                        self._running = False
                        return
                if not active:
                    continue
                responses = [self._speculative.next()] if self._speculative else []
                if len(active) > len(responses):
                    responses += gen.next()[1]
                self.steps += 1
                stopped = [r.uid for r in responses if self._emit(active, r)]
                del responses  # finished ones carry their caches: on_step must not see them alive
                if stopped:  # a stop string ended them before mlx-lm would have
                    self._remove(gen, stopped)
                if self._speculative and self._speculative.uid not in active:
                    self._remove(gen, [SPECULATIVE])
                self.on_step()
        except Exception as e:  # a node went down, ...: every waiting request hears it
            logger.warning("generation failed: %s", e)
            for a in active.values():
                a.request.pieces.put(e)
            self._generator = None  # a fresh one next time: this one's caches may be half-updated
            gen = self._speculative = None
            self.on_step()
            with self._lock:
                self._running = False
                self._start_locked()

    def _remove(self, gen: BatchGenerator, uids: list) -> None:
        if SPECULATIVE in uids and self._speculative is not None:
            self._speculative.close()
            self._speculative = None
        batched = [u for u in uids if u != SPECULATIVE]
        if batched:
            gen.remove(batched)

    def _admit(self, gen: BatchGenerator, active: dict) -> None:
        while len(active) < self.max_batch:
            try:
                req = self._incoming.get_nowait()
            except queue.Empty:
                return
            if req.cancelled.is_set():
                req.pieces.put(None)
                continue
            o = req.options  # samplers hold mlx arrays: build them here, on the MLX thread
            sampler = make_sampler(temp=o.temperature, top_p=o.top_p, min_p=o.min_p, top_k=o.top_k)
            processors = make_logits_processors(repetition_penalty=o.repetition_penalty,
                                                repetition_context_size=o.repetition_context_size)
            if o.seed is not None:  # mlx's generator is global: repeatable when the request runs alone
                mx.random.seed(o.seed)
            if self.draft is not None and o.temperature == 0 and not active:
                uid = SPECULATIVE
                self._speculative = SpeculativeStream(uid, self.model, self.draft, req.tokens, req.max_tokens,
                                                      self.tokenizer.eos_token_ids, sampler, processors)
            else:
                (uid,) = gen.insert([req.tokens], max_tokens=[req.max_tokens], samplers=[sampler],
                                    logits_processors=[processors],
                                    stop_sequences=[make_stop_sequences(self.tokenizer)])
            active[uid] = _Active(req, copy.deepcopy(self.tokenizer.detokenizer),
                                  StopStrings(self.tokenizer, o.stop), tic=time.perf_counter())

    def _emit(self, active: dict, r) -> bool:
        """Hand one token to its request; True when a stop string ended it early."""
        a = active[r.uid]
        if a.count == 0:
            a.tic = time.perf_counter()  # decode speed counts from the first token, as mlx-lm does
        a.count += 1
        if r.token not in self.tokenizer.eos_token_ids:
            a.detokenizer.add_token(r.token)
        if r.finish_reason:
            a.detokenizer.finalize()
        text, finish_reason = a.stops.feed(r.token, a.detokenizer.last_segment, r.finish_reason)
        elapsed = time.perf_counter() - a.tic
        a.request.pieces.put(Piece(text, r.token, finish_reason, len(a.request.tokens), a.count,
                                   a.count / elapsed if a.count > 1 and elapsed > 0 else 0.0))  # none yet
        if finish_reason is None:
            return False
        del active[r.uid]
        a.request.pieces.put(None)
        return r.finish_reason is None
