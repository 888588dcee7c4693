"""OLMoE (OLMoE-1B-7B): softmax over all experts, top-k, and by default no
renormalisation of the k scores (``norm_topk_prob=False``)."""

import mlx.core as mx

from .base import Adapter as BaseAdapter
from .base import RemoteBlock


class RemoteSparseMoeBlock(RemoteBlock):
    """mlx-lm's ``OlmoeSparseMoeBlock`` gating, experts on the mesh."""

    keep = ("gate", "top_k", "norm_topk_prob")

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        routing_weights = mx.softmax(self.gate(x.reshape(-1, x.shape[-1])), axis=1, precise=True)
        k = self.top_k
        inds = mx.argpartition(-routing_weights, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(routing_weights, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        return inds.reshape(*x.shape[:-1], k), scores.reshape(*x.shape[:-1], k)


class Adapter(BaseAdapter):
    model_type = "olmoe"
    remote_class = RemoteSparseMoeBlock
