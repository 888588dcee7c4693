"""Whether generated tokens are mlx-lm's greedy choices, to within a tolerance
(shared by the tests and ``benchmarks/devicecheck.py``)."""

from __future__ import annotations

import mlx.core as mx


def not_greedy(reference, prompt: str, tokens: list[int], tol: float) -> list[tuple[int, float]]:
    """(position, shortfall) where ``tokens`` is not mlx-lm's greedy choice, to within
    ``tol``, given the tokens before it: mlx-lm's logits on the prompt and ``tokens``
    (``reference``: ``mlx_lm.load``'s model and tokenizer)."""
    model, tok = reference
    ids = tok.encode(prompt)
    logits = model(mx.array([ids + tokens]))[0, len(ids) - 1:-1].astype(mx.float32)
    chosen = mx.take_along_axis(logits, mx.array(tokens)[:, None], axis=-1)[:, 0]
    short = (logits.max(axis=-1) - chosen).tolist()
    return [(i, s) for i, s in enumerate(short) if s > tol]
