"""Engine: prompts and conversations in, token pieces out; generation is
batched across requests by the Scheduler on the router's MLX thread."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterator

import mlx.nn as nn

from ..errors import InvalidRequestError, RequestTooLargeError, UnavailableError
from ..options import GenerationOptions
from ..worker import MLXWorker
from .batching import MAX_BATCH, MAX_WAITING, Piece, Request, Scheduler
from .speculative import Draft
from .stats import RequestStats

logger = logging.getLogger(__name__)

CALLER_POLL_S = 0.5  # how often a waiting stream checks that its caller is still there

# apply_chat_template arguments a request may not set: the router asks for token ids itself
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict",
    "return_tensors", "return_assistant_tokens_mask", "padding", "truncation", "max_length", "tokenizer_kwargs"})


class Engine:
    """Generates with mlx-lm on the (remote-expert) model; callers stream pieces."""

    def __init__(self, model: nn.Module, tokenizer, config: dict, default_max_tokens: int = 256,
                 draft: Draft | None = None, max_batch: int = MAX_BATCH, max_waiting: int = MAX_WAITING):
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = int(config.get("max_position_embeddings") or 1 << 31)
        self.vocab_size = int(config.get("vocab_size") or 0)
        # no token spans more characters than the longest in the vocabulary, so a longer
        # text cannot fit the context: refused before tokenizing megabytes of it
        self.max_chars = self.context_length * max(map(len, tokenizer.get_vocab()), default=64)
        self.default_max_tokens = default_max_tokens
        self.worker = MLXWorker("mlx-router")
        self.scheduler = Scheduler(model, tokenizer, self.worker, max_batch=max_batch, draft=draft,
                                   max_waiting=max_waiting)
        self.stats = RequestStats()
        self.closing = ""  # why new requests are refused: the router is shutting down
        self._open: dict[int, Request] = {}  # id -> request whose stream is open
        self._open_changed = threading.Condition()

    def close(self) -> None:
        self.worker.close()

    # --- shutting down ------------------------------------------------------------
    def drain(self, reason: str) -> int:
        """Refuse new requests with ``UnavailableError(reason)`` from now on;
        returns how many are still being generated."""
        with self._open_changed:
            self.closing = reason
            return len(self._open)

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait until no request is being generated; False on timeout."""
        with self._open_changed:
            return self._open_changed.wait_for(lambda: not self._open, timeout)

    def abort(self, reason: str) -> int:
        """End every request being generated with ``UnavailableError(reason)``; returns how many."""
        with self._open_changed:
            for request in self._open.values():
                request.pieces.put(UnavailableError(reason))
            return len(self._open)

    def encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        add_special = tok.bos_token is None or not prompt.startswith(tok.bos_token)
        return tok.encode(prompt, add_special_tokens=add_special)

    def apply_chat_template(self, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
        """The tokens mlx-lm would generate from for this conversation: its
        server's, with the checkpoint's chat template, or without one its
        plain role-prefixed prompt (``mlx_lm.server.convert_chat``).

        Raises:
            InvalidRequestError: no messages, a malformed one, template
                arguments that are not the template's to take, or the
                template rejects the conversation.
        """
        messages = [_message(m, i) for i, m in enumerate(messages or [])]
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & kwargs.keys())
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs must not set {', '.join(reserved)}: the router "
                                      "renders and tokenizes the conversation itself", param="chat_template_kwargs")
        if not self.tokenizer.has_chat_template:
            from mlx_lm.server import convert_chat  # what mlx-lm's server does without a template
            return self._checked(self.tokenizer.encode(convert_chat(messages)), "messages")
        try:
            tokens = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
        except Exception as e:  # jinja raises what the template says: the conversation's fault
            raise InvalidRequestError(f"the chat template rejects these messages: {e}", param="messages") from None
        return self._checked(tokens, "messages")

    def _checked(self, tokens, param: str) -> list[int]:
        """``tokens`` as a list of token ids of this vocabulary.

        Raises:
            InvalidRequestError: anything else (a template that renders text, ids out of range).
        """
        if not isinstance(tokens, (list, tuple)) or not all(type(t) is int for t in tokens):
            raise InvalidRequestError(f"the {param} did not render to token ids (got {type(tokens).__name__})",
                                      param=param)
        if self.vocab_size and tokens and not 0 <= min(tokens) <= max(tokens) < self.vocab_size:
            raise InvalidRequestError(f"the {param} has token ids outside the vocabulary of {self.vocab_size}",
                                      param=param)
        return list(tokens)

    def generate(self, prompt: str, options: GenerationOptions = GenerationOptions(),
                 is_active: Callable[[], bool] = lambda: True) -> Iterator[Piece]:
        """Stream the completion of ``prompt``.

        Raises:
            InvalidRequestError: empty prompt, one longer than the context, or bad options.
            UnavailableError: a node went down.
        """
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt must be a string", param="prompt")
        self._check_length(len(prompt), "prompt")
        try:
            tokens = self.encode(prompt)
        except (ValueError, TypeError, UnicodeError) as e:  # a lone surrogate, say
            raise InvalidRequestError(f"the prompt cannot be tokenized: {e}", param="prompt") from None
        return self._start(self._checked(tokens, "prompt"), options, "prompt", is_active, "generate")

    def chat(self, messages: list[dict], options: GenerationOptions = GenerationOptions(),
             chat_template_kwargs: dict | None = None,
             is_active: Callable[[], bool] = lambda: True) -> Iterator[Piece]:
        """Stream the assistant's reply to ``messages`` (``{"role", "content"}`` dicts).

        Raises:
            InvalidRequestError: see ``apply_chat_template`` and ``generate``.
            UnavailableError: a node went down.
        """
        return self._start(self.apply_chat_template(messages, chat_template_kwargs), options, "messages", is_active,
                           "chat")

    def _check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise RequestTooLargeError(
                f"the {param} is {chars} characters; more than the model's context of {self.context_length} "
                f"tokens can hold", param=param, code="context_length_exceeded")

    def _start(self, tokens: list[int], options: GenerationOptions, param: str, is_active,
               kind: str) -> Iterator[Piece]:
        if self.closing:
            raise UnavailableError(self.closing)
        options.validate()
        if not tokens:
            raise InvalidRequestError(f"the {param} is empty", param=param)
        if len(tokens) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens; the model's context is {self.context_length}",
                param=param, code="context_length_exceeded")
        if self.vocab_size and options.top_k >= self.vocab_size:
            raise InvalidRequestError(f"top_k must be below the vocabulary size {self.vocab_size}", param="top_k")
        room = self.context_length - len(tokens)
        if (options.max_tokens or 0) > room:  # asked for: say so; the router's default is cut to fit instead
            raise InvalidRequestError(
                f"max_tokens is {options.max_tokens}, but the prompt's {len(tokens)} tokens leave room for {room} "
                f"in the model's context of {self.context_length}: ask for at most {room}",
                param="max_tokens", code="context_length_exceeded")
        max_tokens = min(options.max_tokens or self.default_max_tokens, room)
        self.stats.started(kind)
        return self._stream(tokens, max_tokens, options, is_active)

    def _stream(self, tokens, max_tokens, options, is_active) -> Iterator[Piece]:
        request = Request(tokens, max_tokens, options)
        start = time.perf_counter()
        with self._open_changed:
            self._open[id(request)] = request
        self.scheduler.submit(request)
        try:
            while (item := _next_piece(request, is_active)) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.generation_tokens == 1:
                    self.stats.first_token(time.perf_counter() - start)
                self.stats.token()
                yield item
                if not is_active():
                    break
        finally:
            request.cancelled.set()
            with self._open_changed:
                del self._open[id(request)]
                self._open_changed.notify_all()


def _next_piece(request: Request, is_active: Callable[[], bool]):
    """The request's next item; None too once its caller has gone (while it waits
    its turn or a slow step runs, not only after each token)."""
    while True:
        try:
            return request.pieces.get(timeout=CALLER_POLL_S)
        except queue.Empty:
            if not is_active():
                return None


def _message(m, i: int) -> dict:
    """An OpenAI-style message as the template wants it: text content only."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise InvalidRequestError(f"messages[{i}] must be an object with a string role", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise InvalidRequestError(f"messages[{i}]: only text content is supported", param="messages")
        content = "".join(str(p.get("text", "")) for p in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise InvalidRequestError(f"messages[{i}].content must be a string", param="messages")
    return {**m, "content": content}
