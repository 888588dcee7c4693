"""GenerationOptions: how to sample and when to stop, shared by the SDK, the
gRPC service and the OpenAI-compatible HTTP API."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import InvalidRequestError, RequestTooLargeError

_NUMBER = (int, float)

# field: (accepted types, lowest, highest); None is always accepted where the default is None
_BOUNDS = {
    "max_tokens": (int, 1, None),
    "temperature": (_NUMBER, 0, None),
    "top_p": (_NUMBER, 0, 1),
    "top_k": (int, 0, None),
    "min_p": (_NUMBER, 0, 1),
    "repetition_penalty": (_NUMBER, 0, None),
    "repetition_context_size": (int, 1, None),
    "seed": (int, 0, (1 << 63) - 1),
}
MAX_STOPS = 64           # stop strings per request
MAX_STOP_CHARS = 1024    # characters per stop string


@dataclass(frozen=True)
class GenerationOptions:
    """How to sample and when to stop; the defaults are greedy decoding.

    The fields mean what they mean in mlx-lm (``make_sampler``,
    ``make_logits_processors`` and the server's stop words).
    """

    max_tokens: int | None = None             # None: the router's default
    temperature: float = 0.0                  # 0: greedy
    top_p: float = 1.0                        # 0 or 1: off
    top_k: int = 0                            # 0: off
    min_p: float = 0.0                        # 0: off
    repetition_penalty: float | None = None   # None or 0: off
    repetition_context_size: int = 20         # tokens the penalty looks back over
    seed: int | None = None                   # makes sampling repeatable
    stop: tuple[str, ...] = ()                # text ends before the first of these

    def validate(self) -> "GenerationOptions":
        """Check types and ranges; return self.

        Raises:
            InvalidRequestError: naming the field at fault in ``param``.
        """
        for name, (types, low, high) in _BOUNDS.items():
            value = getattr(self, name)
            if value is None and _DEFAULTS[name] is None:
                continue
            if isinstance(value, bool) or not isinstance(value, types):
                kind = "an integer" if types is int else "a number"
                raise InvalidRequestError(f"{name} must be {kind}, not {value!r}", param=name)
            if not math.isfinite(value):
                raise InvalidRequestError(f"{name} must be a finite number, not {value!r}", param=name)
            if (low is not None and value < low) or (high is not None and value > high):
                span = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise InvalidRequestError(f"{name} must be {span}, not {value!r}", param=name)
        if self.stop is None:
            raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
        if not all(self.stop):
            raise InvalidRequestError("stop strings must not be empty", param="stop")
        if not all(map(_is_text, self.stop)):
            raise InvalidRequestError("stop strings must be valid Unicode text (no lone surrogates)", param="stop")
        if len(self.stop) > MAX_STOPS or max(map(len, self.stop), default=0) > MAX_STOP_CHARS:
            raise RequestTooLargeError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters",
                                       param="stop")
        return self

    def replace(self, **changes) -> "GenerationOptions":
        """A copy with ``changes``; a string ``stop`` becomes a one-element tuple.

        Raises:
            InvalidRequestError: a field GenerationOptions does not have.
        """
        unknown = set(changes) - set(_DEFAULTS)
        if unknown:
            raise InvalidRequestError(f"unknown option {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
        stop = changes.get("stop", self.stop)
        changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, (list, tuple)) else stop

        return dataclasses.replace(self, **changes)

    # --- the flat fields GenerateRequest and ChatRequest share ---------------
    def to_fields(self) -> dict:
        """Keyword arguments for ``GenerateRequest`` / ``ChatRequest``."""
        return dict(max_tokens=self.max_tokens or 0, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty or 0.0,
                    repetition_context_size=self.repetition_context_size, seed=self.seed, stop=list(self.stop))

    @classmethod
    def from_message(cls, m) -> "GenerationOptions":
        """From a ``GenerateRequest`` or ``ChatRequest``: zero values are defaults."""
        return cls(max_tokens=m.max_tokens or None, temperature=m.temperature, top_p=m.top_p or 1.0,
                   top_k=m.top_k, min_p=m.min_p, repetition_penalty=m.repetition_penalty or None,
                   repetition_context_size=m.repetition_context_size or 20,
                   seed=m.seed if m.HasField("seed") else None, stop=tuple(m.stop))


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerationOptions)}


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check(ok: bool, param: str, message: str) -> None:
    """Config classes' validation: unless ``ok``, raise ``InvalidRequestError(message, param=param)``."""
    if not ok:
        raise InvalidRequestError(message, param=param)


def is_port(value, optional: bool = False) -> bool:
    """A TCP port (0 picks a free one); ``None`` too where ``optional``."""
    return (optional and value is None) or (type(value) is int and 0 <= value <= 65535)


def is_positive(value, optional: bool = False) -> bool:
    """A finite number above zero; ``None`` too where ``optional``."""
    if optional and value is None:
        return True
    return isinstance(value, _NUMBER) and not isinstance(value, bool) and math.isfinite(value) and value > 0
