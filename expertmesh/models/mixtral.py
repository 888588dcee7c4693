"""Mixtral (Mixtral-8x7B, 8x22B): ``block_sparse_moe`` with experts
``w1``/``w2``/``w3``; top-k of the raw gate logits, then softmax over those k."""

import mlx.core as mx
import mlx.nn as nn

from .base import Adapter as BaseAdapter
from .base import RemoteExperts


class RemoteSparseMoeBlock(nn.Module):
    """mlx-lm's ``MixtralSparseMoeBlock`` gating, experts on the mesh."""

    def __init__(self, block: nn.Module, layer: int):
        super().__init__()
        self.gate = block.gate
        self.num_experts_per_tok = block.num_experts_per_tok
        self.experts = RemoteExperts(layer)

    def __call__(self, x: mx.array) -> mx.array:
        gates = self.gate(x)
        k = self.num_experts_per_tok
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        scores = mx.softmax(scores, axis=-1, precise=True)
        return self.experts(x, inds, scores)


class Adapter(BaseAdapter):
    model_type = "mixtral"
    block_attr = "block_sparse_moe"
    num_experts_field = "num_local_experts"
    hf_names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0

    def remote_block(self, block, layer):
        return RemoteSparseMoeBlock(block, layer)
