"""Mixtral (Mixtral-8x7B, 8x22B): ``block_sparse_moe`` with experts
``w1``/``w2``/``w3``; top-k of the raw gate logits, then softmax over those k."""

import mlx.core as mx

from .base import Adapter as BaseAdapter
from .base import RemoteBlock


class RemoteSparseMoeBlock(RemoteBlock):
    """mlx-lm's ``MixtralSparseMoeBlock`` gating, experts on the mesh."""

    keep = ("gate", "num_experts_per_tok")

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        gates = self.gate(x)
        k = self.num_experts_per_tok
        inds = mx.argpartition(-gates, kth=k - 1, axis=-1)[..., :k]
        scores = mx.take_along_axis(gates, inds, axis=-1)
        scores = mx.softmax(scores, axis=-1, precise=True)
        return inds, scores


class Adapter(BaseAdapter):
    model_type = "mixtral"
    remote_class = RemoteSparseMoeBlock
    block_attr = "block_sparse_moe"
    num_experts_field = "num_local_experts"
    hf_names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
