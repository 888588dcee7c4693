"""Engine: requests in, token pieces out; generation batched by the Scheduler."""

from __future__ import annotations

import logging
from typing import Callable, Iterator

import mlx.nn as nn
from mlx_lm.sample_utils import make_sampler

from ..errors import InvalidRequestError
from ..worker import MLXWorker
from .batching import Piece, Request, Scheduler

logger = logging.getLogger(__name__)


class Engine:
    """Generates with mlx-lm on the (remote-expert) model; callers stream pieces."""

    def __init__(self, model: nn.Module, tokenizer, config: dict, default_max_tokens: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(config.get("max_position_embeddings") or 1 << 31)
        self.default_max_tokens = default_max_tokens
        self.worker = MLXWorker("mlx-router")
        self.scheduler = Scheduler(model, tokenizer, self.worker)

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
        return self._stream(Request(tokens, max_tokens, sampler, seed=seed), is_active)

    def _stream(self, request: Request, is_active) -> Iterator[Piece]:
        self.scheduler.submit(request)
        try:
            while (item := request.pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                if not is_active():
                    break
        finally:
            request.cancelled.set()
