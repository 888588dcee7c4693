"""An OpenAI-compatible HTTP API on the router, so chat UIs and agents that
speak to mlx-lm's server, exo or LM Studio can speak to the mesh.

``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``;
streaming as server-sent events; errors as ``{"error": {"message", "type",
"param", "code"}}``. With a cluster token every request needs
``Authorization: Bearer <token>`` (401 otherwise); with TLS files it is HTTPS
with client certificates, like the gRPC API. Handler threads never touch mlx: they call
``Router.generate`` / ``Router.chat``, which run the model on the router's
MLX worker.

Limits (``Limits``), so that one client never costs another: at most
``max_connections`` connections at once (others get 503 at once); a
request's line, headers and body must arrive within ``read_s`` in all (a
slow-loris client is cut off) and every read or write within ``io_s``; a body
is at most ``MAX_BODY_BYTES``; a generation runs at most ``request_s``. A
client that goes away, streaming or not, ends its generation at the next
token, which frees its batch slot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http import HTTPStatus

from .. import __version__
from ..errors import ExpertmeshError, InvalidRequestError, OverloadedError, RequestTooLargeError, UnavailableError
from ..options import GenerationOptions
from ..security import bearer
from .boundedhttp import BoundedHandler, BoundedHTTPServer, Limits

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
_BODY_CHUNK = 64 << 10  # a body is read as it arrives, not allocated at its Content-Length
# body fields that are GenerationOptions fields under the same name
_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "seed", "stop")


class OpenAIServer:
    """``/v1`` endpoints served by a router from a thread of their own.

    Raises:
        UnavailableError: the address cannot be bound.
    """

    def __init__(self, router, host: str, port: int, limits: Limits = Limits()):
        try:
            self._httpd = _Server((host, port), _Handler, limits)
        except OSError as e:
            raise UnavailableError(f"cannot listen for HTTP on {host}:{port}: {e}") from None
        security = router.config.security
        if security.tls:  # the handshake runs in the handler thread, not in accept()
            self._httpd.socket = security.server_ssl_context().wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False)
        self._httpd.security = security
        self._httpd.daemon_threads = True
        self._httpd.router = router
        self._httpd.created = int(time.time())
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-http", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self._httpd.security.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    def start(self) -> "OpenAIServer":
        self._thread.start()
        logger.debug("OpenAI-compatible API on %s", self.url)  # the CLI prints it
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.watchdog.close()


class _Server(BoundedHTTPServer):
    def handle_error(self, request, client_address):
        logger.debug("HTTP connection from %s failed", client_address[0], exc_info=True)  # e.g. a TLS handshake

    def busy_body(self) -> dict:
        message = f"the router has {self.limits.max_connections} HTTP connections open; retry later"
        return _error_json(message, "server_error", None, "too_many_connections")


class _Handler(BoundedHandler):
    server_version = f"expertmesh/{__version__}"
    _expires = float("inf")  # when the generation must end (monotonic)

    def _active(self) -> bool:
        """The client is still there and the generation within its time (asked at each token)."""
        return time.monotonic() < self._expires and not self.peer_gone()

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def _refused(self) -> bool:
        """Answer 401 when the cluster token is wanted and not given."""
        why = self.server.security.token_error(bearer(self.headers.get("Authorization")))
        if why:
            self._json(HTTPStatus.UNAUTHORIZED, _error_json(f"{why} (send Authorization: Bearer <token>)",
                                                            "invalid_request_error", None, "invalid_api_key"))
        return bool(why)

    # --- routes ----------------------------------------------------------------
    def do_GET(self):
        self.request_read()
        if self._refused():
            return
        if self.path.rstrip("/") == "/v1/models":
            model = self._model_card()
            self._json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif self.path == f"/v1/models/{self._model_card()['id']}":
            self._json(HTTPStatus.OK, self._model_card())
        else:
            self._not_found()

    def do_POST(self):
        if self._refused():
            return
        kinds = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat.completion"}
        kind = kinds.get(self.path)
        if kind is None:
            return self._not_found()
        try:
            body = self._read_json()
            self.request_read()
            self._expires = time.monotonic() + self.server.limits.request_s
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise InvalidRequestError("stream must be true or false", param="stream")
            if body.get("n") not in (None, 1):
                raise InvalidRequestError("only n=1 is supported", param="n")
            options = _options(body)
            pieces = self._start(kind, body, options)
            first = next(pieces, None)  # errors before the first token still get a status
        except ExpertmeshError as e:
            return self._error(e)
        except Exception:
            logger.exception("%s %s failed", self.command, self.path)
            return self._error(ExpertmeshError("internal error; see the router's log"))
        reply = _Reply(kind, self._model_card()["id"])
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            self._stream(reply, first, pieces, include_usage)
        else:
            self._complete(reply, first, pieces)

    def _start(self, kind, body, options):
        router = self.server.router
        if kind == "chat.completion":
            if "messages" not in body:
                raise InvalidRequestError("messages is required", param="messages")
            if not isinstance(body["messages"], list):
                raise InvalidRequestError("messages must be a list", param="messages")
            kwargs = body.get("chat_template_kwargs")
            if kwargs is not None and not isinstance(kwargs, dict):
                raise InvalidRequestError("chat_template_kwargs must be an object", param="chat_template_kwargs")
            return router.chat(body["messages"], options=options, chat_template_kwargs=kwargs, is_active=self._active)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidRequestError("prompt is required and must be a string", param="prompt")
        return router.generate(prompt, options=options, is_active=self._active)

    # --- answers -----------------------------------------------------------------
    def _complete(self, reply: "_Reply", first, pieces) -> None:
        text, last = [], first
        try:
            for piece in _chain(first, pieces):
                text.append(piece.text)
                last = piece
            if last is not None and last.finish_reason is None:  # the client left or the time ran out
                raise self._cut_short()
        except _ClientGone:
            logger.info("HTTP client went away; generation stopped")
            self.close_connection = True
            return
        except ExpertmeshError as e:
            return self._error(e)
        finally:
            pieces.close()  # frees the batch slot at once, however this ends
        self._json(HTTPStatus.OK, reply.whole("".join(text), last))

    def _stream(self, reply: "_Reply", first, pieces, include_usage: bool) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        last = first
        try:
            if reply.chat:
                self._event(reply.chunk("", None, role=True))
            for piece in _chain(first, pieces):
                last = piece
                if piece.text or piece.finish_reason:
                    self._event(reply.chunk(piece.text, piece.finish_reason))
            if last is not None and last.finish_reason is None:
                raise self._cut_short()
            if include_usage and last is not None:
                self._event({**reply.chunk("", None), "choices": [], "usage": _usage(last)})
            self.wfile.write(b"data: [DONE]\n\n")
        except _ClientGone:
            logger.info("HTTP client went away; generation stopped")
        except ExpertmeshError as e:
            logger.warning("streamed generation failed: %s", e)
            self._event(_error_body(e)[1])
        except OSError as e:  # reset, broken pipe, or a write that timed out: a client not reading
            logger.info("HTTP client went away (%s); generation stopped", e)
        finally:
            pieces.close()

    def _cut_short(self) -> ExpertmeshError:
        """Why the pieces ended before a finish reason."""
        if time.monotonic() >= self._expires:
            return _TimedOut(f"the generation ran past the router's limit of {self.server.limits.request_s:g}s")
        return _ClientGone()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ExpertmeshError) -> None:
        status, body = _error_body(err)
        logger.info("%s %s: %d %s", self.command, self.path, status, err)
        self._json(status, body)

    def _not_found(self) -> None:
        self._json(HTTPStatus.NOT_FOUND, _error_json(f"no such endpoint: {self.command} {self.path}",
                                                     "invalid_request_error", None, "not_found"))

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise InvalidRequestError("a JSON body with a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise RequestTooLargeError(f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted")
        data, left = [], int(length)
        while left and (chunk := self.rfile.read(min(left, _BODY_CHUNK))):
            data.append(chunk)
            left -= len(chunk)
        if left:
            raise InvalidRequestError(f"the body ended {left} bytes short of its Content-Length")
        try:
            body = json.loads(b"".join(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidRequestError(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON object")
        return body

    def _model_card(self) -> dict:
        return {"id": self.server.router.checkpoint.model_id, "object": "model",
                "created": self.server.created, "owned_by": "expertmesh"}


class _Reply:
    """The JSON of one completion, whole or as stream chunks."""

    def __init__(self, kind: str, model: str):
        self.chat = kind == "chat.completion"
        self.kind = kind
        self.base = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "created": int(time.time()), "model": model}

    def whole(self, text: str, last) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason if last else "length"}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self.base, "object": self.kind, "choices": [choice], "usage": _usage(last)}

    def chunk(self, text: str, finish_reason: str | None, role: bool = False) -> dict:
        choice = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
        else:
            choice["text"] = text
        return {**self.base, "object": f"{self.kind}.chunk" if self.chat else self.kind, "choices": [choice]}


def _options(body: dict) -> GenerationOptions:
    fields = {name: body[name] for name in _OPTIONS if body.get(name) is not None}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return GenerationOptions().replace(**fields).validate()


def _chain(first, rest):
    if first is not None:
        yield first
        yield from rest


def _usage(last) -> dict:
    prompt, completion = (last.prompt_tokens, last.generation_tokens) if last else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_json(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _TimedOut(ExpertmeshError):
    """The generation ran past ``Limits.request_s``."""


class _ClientGone(ExpertmeshError):
    """The client closed its connection mid-generation."""


def _error_body(err: ExpertmeshError) -> tuple[int, dict]:
    """The HTTP status and OpenAI error JSON for one of our errors."""
    if isinstance(err, _TimedOut):
        return HTTPStatus.GATEWAY_TIMEOUT, _error_json(str(err), "server_error", None, "timeout")
    if isinstance(err, RequestTooLargeError):
        return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, _error_json(str(err), "invalid_request_error", err.param, err.code)
    if isinstance(err, InvalidRequestError):
        return HTTPStatus.BAD_REQUEST, _error_json(str(err), "invalid_request_error", err.param, err.code)
    if isinstance(err, UnavailableError):
        return HTTPStatus.SERVICE_UNAVAILABLE, _error_json(str(err), "server_error", None, "unavailable")
    if isinstance(err, OverloadedError):  # what OpenAI answers a client over its rate: it may retry
        return HTTPStatus.TOO_MANY_REQUESTS, _error_json(str(err), "rate_limit_error", None, "overloaded")
    return HTTPStatus.INTERNAL_SERVER_ERROR, _error_json(str(err), "server_error", None, None)
