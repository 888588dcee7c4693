"""What every family adapter provides, and the parts they share."""

from __future__ import annotations

import re
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from .. import compiled
from ..mlxlm import get_classes

# stacked projection names, in mlx-lm's SwitchGLU
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# tensors of one (possibly quantized) projection
PARTS = ("weight", "scales", "biases")

# (layer, hidden [..., H], inds [..., k], scores [..., k]) -> [..., H]
ExpertCall = Callable[[int, mx.array, mx.array, mx.array], mx.array]


class RemoteExperts:
    """Stands where a block's routed experts were; calls out to the mesh.

    The dispatcher is attached after loading (``Adapter.attach``).
    """

    def __init__(self, layer: int):
        self.layer = layer
        self.call: ExpertCall | None = None

    def __call__(self, x: mx.array, inds: mx.array, scores: mx.array, shared: mx.array | None = None) -> mx.array:
        """``sum_j scores_j * expert_{inds_j}(x)``, plus ``shared`` (the block's
        shared experts), which computes here while the nodes compute."""
        if self.call is None:
            raise RuntimeError("no dispatcher attached to the remote experts")
        if shared is None:
            return self.call(self.layer, x, inds, scores)
        mx.async_eval(shared)
        return self.call(self.layer, x, inds, scores) + shared


class RemoteBlock(nn.Module):
    """A family's MoE block with its routed experts on the mesh.

    Keeps the members of mlx-lm's block named in ``keep`` (gate, shared
    experts, settings), at the same paths, so the checkpoint's weights load
    into them; subclasses implement ``route`` with the family's gating.
    """

    keep: tuple[str, ...] = ("gate",)

    def __init__(self, block: nn.Module, layer: int):
        super().__init__()
        for name in self.keep:
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))
        self.experts = RemoteExperts(layer)
        self._route_step = compiled.for_dense(self.route)

    def route(self, x: mx.array) -> tuple[mx.array, ...]:
        """``(inds, scores)``, or ``(inds, scores, shared)`` with the block's
        shared experts' output, for ``x`` [B, L, H]."""
        raise NotImplementedError

    def __call__(self, x: mx.array) -> mx.array:
        route = self._route_step if x.shape[-2] == 1 else self.route
        return self.experts(x, *route(x))


class Adapter:
    """Family-specific knowledge about an mlx-lm MoE model.

    Subclasses set ``remote_class`` (their ``RemoteBlock``), and where the
    family differs: ``block_attr`` (the attribute of a decoder layer holding
    the MoE block), ``num_experts_field`` (the config field counting routed
    experts), ``hf_names`` (HF per-expert projection names for gate/up/down)
    and ``is_moe_layer``.
    """

    model_type: str = ""
    block_attr = "mlp"
    num_experts_field = "num_experts"
    remote_class: type[RemoteBlock]
    hf_names = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    hf_experts = "experts"
    array_mask = False  # the family's attention needs an array mask, never the string "causal"

    def __init__(self, config: dict):
        self.config = config
        self.model_class, self.args_class = get_classes(config)
        self.args = self.args_class.from_dict(config)
        self._expert_re = re.compile(
            rf"^model\.layers\.(\d+)\.{self.block_attr}\."
            rf"(switch_mlp\.|{self.hf_experts}\.\d+\.)"
        )

    # --- shape of the model -------------------------------------------------
    @property
    def num_experts(self) -> int:
        return getattr(self.args, self.num_experts_field) or 0

    @property
    def top_k(self) -> int:
        return self.args.num_experts_per_tok

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0  # most mlx-lm families make every layer sparse

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.args.num_hidden_layers) if self.is_moe_layer(i)]

    def attention_mask(self, h: mx.array, cache=None):
        """The mask mlx-lm's model of this family gives its decoder layers for
        hidden states ``h`` [B, T, H] and the first layer's cache."""
        return create_attention_mask(h, cache, return_array=self.array_mask)

    # --- tensor names -------------------------------------------------------
    def stacked_path(self, layer: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block_attr}.switch_mlp.{proj}"

    def hf_path(self, layer: int, expert: int, proj: str) -> str:
        return f"model.layers.{layer}.{self.block_attr}.{self.hf_experts}.{expert}.{self.hf_names[proj]}"

    def expert_bytes(self, tensors: dict, layer: int) -> int:
        """Bytes of one routed expert of ``layer``, from checkpoint headers."""
        total = 0
        for proj in PROJECTIONS:
            for part in PARTS:
                stacked = tensors.get(f"{self.stacked_path(layer, proj)}.{part}")
                if stacked is not None:
                    total += stacked.nbytes // stacked.shape[0]
                single = tensors.get(f"{self.hf_path(layer, 0, proj)}.{part}")
                if single is not None:
                    total += single.nbytes
        return total

    def layer_bytes(self, tensors: dict, layer: int) -> int:
        """Bytes of every weight of decoder layer ``layer`` (a pipeline stage's share), from headers."""
        prefix = f"model.layers.{layer}."
        return sum(t.nbytes for n, t in tensors.items() if n.startswith(prefix))

    def span_bytes(self, tensors: dict, spans) -> int:
        """Bytes of the whole layers of ``spans`` ([start, end) pairs): what those pipeline stages take."""
        return sum(self.layer_bytes(tensors, l) for a, b in spans for l in range(a, b))

    def is_expert_weight(self, name: str) -> bool:
        return self._expert_re.match(name) is not None

    # --- the dense model on the router ---------------------------------------
    def remote_block(self, block: nn.Module, layer: int) -> nn.Module:
        """A module computing ``block``'s output with remote routed experts."""
        return self.remote_class(block, layer)

    def strip_experts(self, model: nn.Module) -> None:
        """Swap every MoE block of ``model`` for its remote twin, in place."""
        for i, layer in enumerate(model.layers):
            if self.is_moe_layer(i):
                setattr(layer, self.block_attr, self.remote_block(getattr(layer, self.block_attr), i))

    def remote_experts(self, model: nn.Module) -> Iterator[RemoteExperts]:
        for i, layer in enumerate(model.layers):
            if self.is_moe_layer(i):
                yield getattr(layer, self.block_attr).experts

    def attach(self, model: nn.Module, call: ExpertCall) -> None:
        for experts in self.remote_experts(model):
            experts.call = call

    def dense_classes(self, config: dict):
        """``get_model_classes`` for ``mlx_lm.utils.load_model``: the family's
        model class with its routed experts removed before weights load."""
        adapter = self

        class DenseModel(self.model_class):
            def __init__(self, args):
                super().__init__(args)
                adapter.strip_experts(self)

            def sanitize(self, weights):
                weights = {k: v for k, v in weights.items() if not adapter.is_expert_weight(k)}
                return super().sanitize(weights) if hasattr(super(), "sanitize") else weights

        return DenseModel, self.args_class


def eval_private_arrays(model: nn.Module) -> None:
    """Evaluate the constants some mlx-lm models keep as private module members
    (DeepSeek's ``_freqs``): loading evaluates only parameters, and a lazy
    array cannot be evaluated on another thread than the one that built it,
    while generation runs on an MLX worker."""
    mx.eval([v for _, m in model.named_modules() for v in m.values() if isinstance(v, mx.array)])
