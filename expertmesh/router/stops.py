"""StopStrings: end a generation at stop strings, with mlx-lm's matchers."""

from __future__ import annotations

from mlx_lm.generate import TextStateMachine, make_stop_sequences


class StopStrings:
    """Feeds on stream_generate's (token, text, finish_reason); says what text
    to show and whether to stop.

    Like mlx-lm's server: a stop string's token sequence ends the generation
    at once (its text and any held-back text are dropped); and the stop
    strings are matched in the decoded text, which holds back a possible
    partial match until it is resolved. Unlike the server, a match in the
    text also ends the generation, so a stop string tokenized differently
    than on its own still stops it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        stop = tuple(s for s in stop if s)
        self._tokens = make_stop_sequences(tokenizer, stop).matcher() if stop else None
        self._text = TextStateMachine({"normal": [(s, "normal") for s in stop]}) if stop else None
        self._state = self._text.make_state() if stop else None

    def feed(self, token: int, text: str, finish_reason: str | None) -> tuple[str, str | None]:
        """Returns ``(text to show, finish_reason)``; stop after a non-None reason."""
        if self._text is None:
            return text, finish_reason
        if finish_reason is None and self._tokens.advance(token):
            self._state, _ = TextStateMachine.discard(self._state)
            return "", "stop"
        self._state, segments = TextStateMachine.split(self._state, text)
        if len(segments) > 1:  # a stop string matched: keep what came before it
            return segments[0][1], "stop"
        shown = segments[0][1]
        if finish_reason is not None:
            self._state, rest, _ = TextStateMachine.flush(self._state)
            shown += rest
        return shown, finish_reason
