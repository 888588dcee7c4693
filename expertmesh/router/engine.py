"""Engine: token generation on the router's dense model, on one MLX thread."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from ..errors import InvalidRequestError
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


class Engine:
    """Generates with mlx-lm on the (remote-expert) model; callers stream pieces."""

    def __init__(self, model: nn.Module, tokenizer, config: dict, default_max_tokens: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(config.get("max_position_embeddings") or 1 << 31)
        self.default_max_tokens = default_max_tokens
        self.worker = MLXWorker("mlx-router")

    def close(self) -> None:
        self.worker.close()

    def encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
        return tok.encode(prompt, add_special_tokens=add_special)

    def generate(self, prompt: str, max_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 0.0, seed: int | None = None,
                 is_active: Callable[[], bool] = lambda: True) -> Iterator[Piece]:
        """Stream the completion of ``prompt``.

        Raises:
            InvalidRequestError: empty prompt, or one longer than the context.
            UnavailableError: a node went down.
        """
        tokens = self.encode(prompt)
        if not tokens:
            raise InvalidRequestError("the prompt is empty")
        if len(tokens) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens; the model's context is {self.context_length}")
        max_tokens = max_tokens or self.default_max_tokens
        if max_tokens < 0:
            raise InvalidRequestError("max_tokens must be positive")
        max_tokens = min(max_tokens, self.context_length - len(tokens))
        if temperature < 0 or not 0 <= top_p <= 1:
            raise InvalidRequestError("temperature must be >= 0 and top_p in [0, 1]")
        sampler = make_sampler(temp=temperature, top_p=top_p if 0 < top_p < 1 else 0.0)
        return self._stream(tokens, max_tokens, sampler, seed, is_active)

    def _stream(self, tokens, max_tokens, sampler, seed, is_active) -> Iterator[Piece]:
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()
        self.worker.submit(self._generate, tokens, max_tokens, sampler, seed, pieces, stop)
        try:
            while (item := pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not is_active():
                    break
        finally:
            stop.set()

    def _generate(self, tokens, max_tokens, sampler, seed, pieces, stop) -> None:
        """Runs on the MLX worker: one generation, pieces into ``pieces``."""
        try:
            if seed is not None:
                mx.random.seed(seed)
            for r in stream_generate(self.model, self.tokenizer, tokens, max_tokens, sampler=sampler):
                if stop.is_set():
                    logger.info("client went away; generation stopped")
                    break
                pieces.put(Piece(r.text, r.token, r.finish_reason, r.prompt_tokens,
                                 r.generation_tokens, r.generation_tps))
        except Exception as e:
            pieces.put(e)
        pieces.put(None)
