"""Scheduler: continuous batching with mlx-lm's ``BatchGenerator``.

Every decode step of every active sequence is one forward pass, so
concurrent requests share one message per node per MoE layer. The loop runs
on the engine's MLX worker while any sequence is active. With a draft model,
a greedy request that starts alone is decoded speculatively instead
(speculative.py), in turn with the batch of any that arrive meanwhile.

A request's own failure (its sampler, logits processors, stop strings or
detokenizer raising) ends that request alone: its callables are guarded, and
what they raise is handed to it after the step while the batch goes on. Only
a failure of the forward pass itself (a node down, ...) reaches every request.
At most ``max_batch`` requests run and ``max_waiting`` wait; more are refused
with ``OverloadedError``.
"""

from __future__ import annotations

import collections
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

from ..errors import ExpertmeshError, InvalidRequestError, OverloadedError
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


class _Guard:
    """Wraps one request's sampler and logits processors: what they raise is
    kept for that request, and the batch step goes on with a harmless value."""

    def __init__(self):
        self.error: BaseException | None = None

    def sampler(self, fn):
        def sample(logprobs):
            try:
                return fn(logprobs)
            except Exception as e:
                self.error = self.error or e
                return mx.argmax(logprobs, axis=-1)
        return sample

    def processor(self, fn):
        def process(tokens, logits):
            try:
                return fn(tokens, logits)
            except Exception as e:
                self.error = self.error or e
                return logits
        return process


@dataclass
class _Active:
    request: Request
    detokenizer: object
    stops: StopStrings
    guard: _Guard
    count: int = 0
    tic: float = 0.0


def request_error(e: BaseException) -> ExpertmeshError:
    """What a request hears when something of its own failed."""
    if isinstance(e, ExpertmeshError):
        return e
    if isinstance(e, (ValueError, TypeError, UnicodeError, LookupError)):  # its input, as the tokenizer saw it
        return InvalidRequestError(f"this request failed: {type(e).__name__}: {e}")
    return ExpertmeshError(f"this request failed: {type(e).__name__}: {e}")


MAX_BATCH = 32    # sequences decoded together in one forward pass
MAX_WAITING = 64  # requests queued beyond those; more are refused


class Scheduler:
    def __init__(self, model, tokenizer, worker: MLXWorker, max_batch: int = MAX_BATCH,
                 draft: Draft | None = None, max_waiting: int = MAX_WAITING):
        self.model = model
        self.draft = draft
        self.tokenizer = tokenizer
        self.worker = worker
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self._incoming: collections.deque[Request] = collections.deque()  # under _lock
        self._active_count = 0  # running requests, under _lock (the loop's dict is its own)
        self._lock = threading.Lock()
        self._running = False
        self._generator: BatchGenerator | None = None
        self._speculative: SpeculativeStream | None = None
        self.steps = 0  # steps run (a forward pass each, but a speculative token checked already), for tests
        self.peak_batch = 0  # the most sequences one step has decoded together, for tests and benchmarks
        self.on_step: Callable[[], None] = lambda: None  # after each step: e.g. release finished sequences' KV

    def submit(self, request: Request) -> None:
        """Queue ``request``; its pieces arrive on ``request.pieces``.

        Raises:
            OverloadedError: ``max_batch`` requests run and ``max_waiting`` wait already.
        """
        with self._lock:
            if self._active_count + len(self._incoming) >= self.max_batch + self.max_waiting:
                self._incoming = collections.deque(r for r in self._incoming if not r.cancelled.is_set())
            if self._active_count + len(self._incoming) >= self.max_batch + self.max_waiting:
                raise OverloadedError(
                    f"the router is at capacity: {self._active_count} generations running and "
                    f"{len(self._incoming)} waiting (at most {self.max_batch} and {self.max_waiting}); "
                    "try again when some have finished")
            self._incoming.append(request)
            self._start_locked()

    def kv_cache_bytes(self, timeout: float = 60.0) -> int:
        """Bytes of KV cache held once the running steps are done (the loop
        gives the worker back only when no sequence is left)."""
        return self.worker.submit(lambda: self._generator.prompt_cache_nbytes if self._generator else 0).result(timeout)

    def _start_locked(self) -> None:
        """Run the loop on the worker unless it runs already (hold ``_lock``)."""
        if not self._running and self._incoming:
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
                    self._end(gen, active, {uid: None for uid in gone})
                    self.on_step()
                with self._lock:
                    if not active and not self._incoming:
                        self._running = False
                        return
                if not active:
                    continue
                responses = [self._speculative.next()] if self._speculative else []
                if len(active) > len(responses):
                    responses += gen.next()[1]
                    self.peak_batch = max(self.peak_batch, len(responses) - bool(self._speculative))
                self.steps += 1
                failed = {uid: request_error(a.guard.error) for uid, a in active.items() if a.guard.error}
                stopped = []
                for r in responses:
                    if r.uid in failed or r.uid not in active:
                        continue
                    try:
                        if self._emit(active, r):
                            stopped.append(r.uid)
                    except Exception as e:  # its detokenizer or stop strings: its own failure
                        if r.finish_reason:  # mlx-lm took it out of the batch already
                            self._finish(active.pop(r.uid).request, request_error(e))
                        else:
                            failed[r.uid] = request_error(e)
                r = responses = None  # finished ones carry their caches: on_step must not see them alive
                if stopped:  # a stop string ended them before mlx-lm would have
                    self._remove(gen, stopped)
                if failed:
                    for uid, e in failed.items():
                        logger.warning("a request failed alone: %s", e)
                    self._end(gen, active, failed)
                if self._speculative and self._speculative.uid not in active:
                    self._remove(gen, [SPECULATIVE])
                self.on_step()
        except Exception as e:  # a node went down, ...: every waiting request hears it
            logger.warning("generation failed: %s", e)
            for a in active.values():
                self._finish(a.request, e)
            self._generator = None  # a fresh one next time: this one's caches may be half-updated
            gen = self._speculative = None
            self.on_step()
            with self._lock:
                self._running = False
                self._start_locked()

    def _end(self, gen: BatchGenerator, active: dict, ends: dict) -> None:
        """Take these requests out of the batch; each hears its last item (None: done)."""
        self._remove(gen, [uid for uid in ends if uid in active])
        for uid, last in ends.items():
            if uid in active:
                self._finish(active.pop(uid).request, last)

    def _finish(self, request: Request, last: ExpertmeshError | None) -> None:
        """A running request's last item: None when it is done, else its error."""
        request.pieces.put(last)
        with self._lock:
            self._active_count -= 1

    def _remove(self, gen: BatchGenerator, uids: list) -> None:
        if SPECULATIVE in uids and self._speculative is not None:
            self._speculative.close()
            self._speculative = None
        batched = [u for u in uids if u != SPECULATIVE]
        if batched:
            gen.remove(batched)

    def _admit(self, gen: BatchGenerator, active: dict) -> None:
        while len(active) < self.max_batch:
            with self._lock:
                if not self._incoming:
                    return
                req = self._incoming.popleft()
                self._active_count += 1
            if req.cancelled.is_set():
                self._finish(req, None)
                continue
            try:
                uid, entry = self._start_request(gen, req, speculative=not active)
            except Exception as e:  # its options, stop strings, tokens: it alone is refused
                logger.warning("a request could not start: %s", e)
                self._finish(req, request_error(e))
                continue
            active[uid] = entry

    def _start_request(self, gen: BatchGenerator, req: Request, speculative: bool):
        o, guard = req.options, _Guard()  # samplers hold mlx arrays: build them here, on the MLX thread
        stops = StopStrings(self.tokenizer, o.stop)
        detokenizer = copy.deepcopy(self.tokenizer.detokenizer)
        sampler = guard.sampler(make_sampler(temp=o.temperature, top_p=o.top_p, min_p=o.min_p, top_k=o.top_k))
        processors = [guard.processor(p) for p in make_logits_processors(
            repetition_penalty=o.repetition_penalty, repetition_context_size=o.repetition_context_size)]
        if o.seed is not None:  # mlx's generator is global: repeatable when the request runs alone
            mx.random.seed(o.seed)
        if self.draft is not None and o.temperature == 0 and speculative:
            uid = SPECULATIVE
            self._speculative = SpeculativeStream(uid, self.model, self.draft, req.tokens, req.max_tokens,
                                                  self.tokenizer.eos_token_ids, sampler, processors)
        else:
            (uid,) = gen.insert([req.tokens], max_tokens=[req.max_tokens], samplers=[sampler],
                                logits_processors=[processors],
                                stop_sequences=[make_stop_sequences(self.tokenizer)])
        return uid, _Active(req, detokenizer, stops, guard, tic=time.perf_counter())

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
        self._finish(a.request, None)
        return r.finish_reason is None
