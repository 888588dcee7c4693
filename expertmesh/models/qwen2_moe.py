"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): a shared expert behind a
sigmoid gate, which stays on the router."""

import mlx.core as mx
import mlx.nn as nn

from .base import Adapter as BaseAdapter
from .base import RemoteExperts


class RemoteSparseMoeBlock(nn.Module):
    """mlx-lm's ``Qwen2MoeSparseMoeBlock`` gating and shared expert, routed
    experts on the mesh."""

    def __init__(self, block: nn.Module, layer: int):
        super().__init__()
        self.gate = block.gate
        self.top_k = block.top_k
        self.shared_expert = block.shared_expert
        self.shared_expert_gate = block.shared_expert_gate
        self.experts = RemoteExperts(layer)

    def __call__(self, x: mx.array) -> mx.array:
        gates = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.experts(x, inds, scores, shared)


class Adapter(BaseAdapter):
    model_type = "qwen2_moe"

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0  # mlx-lm builds every layer sparse

    def remote_block(self, block, layer):
        return RemoteSparseMoeBlock(block, layer)
