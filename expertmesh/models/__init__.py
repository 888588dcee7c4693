"""Model-family adapters, one module per mlx-lm ``model_type``.

An adapter knows where a family keeps its MoE blocks, its gating rule and its
expert tensor names; everything else comes from mlx-lm's own model class.
"""

from __future__ import annotations

import importlib

from ..errors import ModelError
from .base import Adapter

SUPPORTED = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe")


def get_adapter(config: dict) -> Adapter:
    """The adapter for a checkpoint's ``config.json``.

    Raises:
        ModelError: the model_type is not a supported MoE family, or its
            config has no MoE layer.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ModelError(
            f"model_type {model_type!r} is not supported by expertmesh "
            f"(supported MoE families: {', '.join(SUPPORTED)})"
        )
    module = importlib.import_module(f"{__name__}.{model_type}")
    try:
        adapter = module.Adapter(config)
    except (TypeError, ValueError) as e:  # mlx-lm's ModelArgs refusing the config
        raise ModelError(f"config.json does not describe a {model_type} model: {e}") from None
    if not adapter.moe_layers:
        raise ModelError(f"this {model_type} config has no MoE layer (no routed experts): "
                         "nothing for expertmesh to spread; run it with mlx_lm directly")
    return adapter


__all__ = ["Adapter", "SUPPORTED", "get_adapter"]
