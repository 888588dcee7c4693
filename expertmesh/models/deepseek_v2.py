"""DeepSeek-V2 (V2, V2-Lite, V2.5): mlx-lm's own ``MoEGate`` does the
group-limited greedy top-k and the routed scaling; the first
``first_k_dense_replace`` layers are dense; shared experts stay on the router."""

import mlx.core as mx

from .base import Adapter as BaseAdapter
from .base import RemoteBlock


class RemoteMoE(RemoteBlock):
    """A DeepSeek MoE block: its gate and shared experts here, routed experts
    on the mesh."""

    keep = ("gate", "shared_experts")  # gate: mlx-lm's MoEGate -> (inds, scaled scores)

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        inds, scores = self.gate(x)
        return (inds, scores, self.shared_experts(x)) if "shared_experts" in self else (inds, scores)


class Adapter(BaseAdapter):
    model_type = "deepseek_v2"
    remote_class = RemoteMoE
    num_experts_field = "n_routed_experts"

    def is_moe_layer(self, layer: int) -> bool:
        a = self.args
        return (
            a.n_routed_experts is not None
            and layer >= a.first_k_dense_replace
            and layer % a.moe_layer_freq == 0
        )
