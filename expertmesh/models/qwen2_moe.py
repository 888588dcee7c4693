"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): a shared expert behind a
sigmoid gate, which stays on the router."""

import mlx.core as mx

from .base import Adapter as BaseAdapter
from .base import RemoteBlock


class RemoteSparseMoeBlock(RemoteBlock):
    """mlx-lm's ``Qwen2MoeSparseMoeBlock`` gating and shared expert, routed
    experts on the mesh."""

    keep = ("gate", "top_k", "shared_expert", "shared_expert_gate")

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        gates = mx.softmax(self.gate(x), axis=-1, precise=True)
        k = self.top_k
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        shared = mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return inds, scores, shared


class Adapter(BaseAdapter):
    model_type = "qwen2_moe"
    remote_class = RemoteSparseMoeBlock
