"""The router's half of the model: mlx-lm's model class without routed experts."""

from __future__ import annotations

import logging

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model, load_tokenizer

from ..checkpoint import Checkpoint
from ..compiled import compile_decode_steps
from ..errors import ModelError
from ..models import Adapter, get_adapter
from ..models.base import eval_private_arrays

logger = logging.getLogger(__name__)


def load_dense(checkpoint: Checkpoint) -> tuple[nn.Module, object, Adapter]:
    """Load embeddings, attention, norms, gates, shared experts and lm head.

    Expert tensors are dropped before anything reads them, so they never
    reach memory. Returns ``(model, tokenizer, adapter)``.

    Raises:
        ModelError: unsupported model_type, or weights that do not fit it.
    """
    adapter = get_adapter(checkpoint.config)
    try:
        tokenizer = load_tokenizer(checkpoint.path, eos_token_ids=checkpoint.config.get("eos_token_id"))
        if not tokenizer.encode("Hello world"):  # transformers falls back to an empty vocabulary without files
            raise ModelError(f"{checkpoint.path} has no usable tokenizer (tokenizer.json, or tokenizer.model, or "
                             "vocab.json and merges.txt, with tokenizer_config.json): copy the checkpoint's "
                             "tokenizer files into it")
        path = checkpoint.dense_dir(adapter.is_expert_weight)  # a repo's dense tensors only, fetched by range
        model, _ = load_model(path, get_model_classes=adapter.dense_classes)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ModelError(f"cannot load {checkpoint.path}: {e}") from None
    # the engine refuses prompts longer than the context itself; transformers' warning about them is noise
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)
    eval_private_arrays(model)
    compile_decode_steps(model)
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    logger.info("dense model of %s: %.1f M parameters", checkpoint.model_id, params / 1e6)
    return model, tokenizer, adapter
