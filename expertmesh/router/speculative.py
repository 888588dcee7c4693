"""Speculative decoding: a small draft model on the router proposes tokens,
the mesh checks them all in one forward pass.

Every forward pass through the mesh costs its round trips (one per expert-mode
MoE layer, one per stage span) whatever its number of tokens, so each draft
token the model accepts is a token without round trips of its own. mlx-lm's
``speculative_generate_step`` does the work; it needs trimmable caches (local
KV caches in expert mode; stage caches forward the trim to their node).

mlx-lm's ``BatchGenerator`` has no speculative path, so the scheduler decodes
speculatively only a greedy request that starts while nothing else runs;
requests arriving meanwhile batch among themselves, one step each in turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import speculative_generate_step
from mlx_lm.utils import load_model, load_tokenizer

from ..errors import ModelError

logger = logging.getLogger(__name__)


@dataclass
class Draft:
    model: nn.Module
    num_draft_tokens: int = 3  # tokens proposed per forward pass through the mesh


def load_draft(path: Path, tokenizer, num_draft_tokens: int) -> Draft:
    """Load a draft model that runs wholly on the router.

    Raises:
        ModelError: it cannot be loaded, or its tokenizer is not the model's.
    """
    if not (Path(path) / "config.json").is_file():
        raise ModelError(f"the draft model {path} is not a checkpoint directory (no config.json in it)")
    try:
        model, config = load_model(Path(path))
        draft_tokenizer = load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id"))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ModelError(f"cannot load the draft model {path}: {e}") from None
    if draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ModelError(f"the draft model {path} has another tokenizer than the model: "
                         "speculative decoding needs the same vocabulary")
    logger.info("draft model %s proposes %d tokens per forward pass", path, num_draft_tokens)
    return Draft(model, num_draft_tokens)


@dataclass
class Token:
    """One token of a speculative stream, shaped as ``BatchGenerator``'s responses."""

    uid: object
    token: int
    finish_reason: str | None


class SpeculativeStream:
    """One request decoded by ``speculative_generate_step``; ``next`` gives one token."""

    def __init__(self, uid, model: nn.Module, draft: Draft, tokens: list[int], max_tokens: int,
                 eos_token_ids, sampler, logits_processors):
        self.uid, self.max_tokens, self.eos = uid, max_tokens, set(eos_token_ids)
        self.count = 0
        self._steps = speculative_generate_step(mx.array(tokens), model, draft.model,
                                                num_draft_tokens=draft.num_draft_tokens, max_tokens=max_tokens,
                                                sampler=sampler, logits_processors=logits_processors)

    def next(self) -> Token:
        token, _, _ = next(self._steps)
        self.count += 1
        token = int(token)
        reason = "stop" if token in self.eos else "length" if self.count >= self.max_tokens else None
        return Token(self.uid, token, reason)

    def close(self) -> None:
        self._steps.close()
