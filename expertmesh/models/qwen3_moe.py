"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-Coder-30B-A3B)."""

import mlx.core as mx

from .base import Adapter as BaseAdapter
from .base import RemoteBlock


class RemoteSparseMoeBlock(RemoteBlock):
    """mlx-lm's ``Qwen3MoeSparseMoeBlock`` gating, experts on the mesh."""

    keep = ("gate", "top_k", "norm_topk_prob")

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        gates = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        inds = mx.argpartition(gates, kth=-k, axis=-1)[..., -k:]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        if self.norm_topk_prob:
            scores /= mx.sum(scores, axis=-1, keepdims=True)
        return inds, scores


class Adapter(BaseAdapter):
    model_type = "qwen3_moe"
    remote_class = RemoteSparseMoeBlock

    def is_moe_layer(self, layer: int) -> bool:
        a = self.args
        return (
            layer not in a.mlp_only_layers
            and a.num_experts > 0
            and (layer + 1) % a.decoder_sparse_step == 0
        )
