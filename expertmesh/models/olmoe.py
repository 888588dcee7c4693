"""OLMoE (OLMoE-1B-7B): softmax over all experts, top-k, and by default no
renormalisation of the k scores (``norm_topk_prob=False``)."""

import mlx.core as mx
import mlx.nn as nn

from .base import Adapter as BaseAdapter
from .base import RemoteExperts


class RemoteSparseMoeBlock(nn.Module):
    """mlx-lm's ``OlmoeSparseMoeBlock`` gating, experts on the mesh."""

    def __init__(self, block: nn.Module, layer: int):
        super().__init__()
        self.gate = block.gate
        self.top_k = block.top_k
        self.norm_topk_prob = block.norm_topk_prob
        self.experts = RemoteExperts(layer)

    def __call__(self, x: mx.array) -> mx.array:
        B, L, D = x.shape
        x_flat = x.reshape(-1, D)
        routing_weights = mx.softmax(self.gate(x_flat), axis=1, precise=True)
        k = self.top_k
        inds = mx.argpartition(-routing_weights, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(routing_weights, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return self.experts(x_flat, inds, scores).reshape(B, L, D)


class Adapter(BaseAdapter):
    model_type = "olmoe"

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0

    def remote_block(self, block, layer):
        return RemoteSparseMoeBlock(block, layer)
