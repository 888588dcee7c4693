"""A switch MLP whose gate and up projections are one gathered matmul.

mlx-lm's ``SwitchGLU`` runs three ``gather_qmm`` (or ``gather_mm``) calls per
MoE block: gate, up and down. On a decode step each is a small kernel whose
cost is mostly fixed, so the gate's and the up projection's weights are
stacked along their output rows and run as one call (the same dot products:
each output row still reduces over the same inputs), then split. The block's
parameters change names (``gate_up`` for ``gate_proj`` and ``up_proj``), so
this is applied after the checkpoint's weights are loaded, to modules that
only serve.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchLinear

from .mlxlm import gather_sort, scatter_unsort

_enabled = True


def configure(enabled: bool) -> None:
    """Whether switch MLPs built from now on in this process are fused (for A/B measurements)."""
    global _enabled
    _enabled = bool(enabled)


def _stacked(gate: nn.Module, up: nn.Module) -> nn.Module:
    """One switch linear holding ``gate``'s output rows, then ``up``'s."""
    E, out = gate.weight.shape[0], gate.weight.shape[1] + up.weight.shape[1]
    if isinstance(gate, QuantizedSwitchLinear):
        both = QuantizedSwitchLinear(gate.input_dims, out, E, bias=False, group_size=gate.group_size,
                                     bits=gate.bits, mode=gate.mode)
        both.scales = mx.concatenate([gate.scales, up.scales], axis=1)
        both.biases = None if gate.biases is None else mx.concatenate([gate.biases, up.biases], axis=1)
        both.global_scale = None
    else:
        both = SwitchLinear(gate.input_dims, out, E, bias=False)
    both.weight = mx.concatenate([gate.weight, up.weight], axis=1)
    if "bias" in gate:
        both.bias = mx.concatenate([gate.bias, up.bias], axis=1)
    return both


class FusedSwitchGLU(nn.Module):
    """``SwitchGLU``'s computation with its gate and up projections in one call."""

    def __init__(self, glu: SwitchGLU):
        super().__init__()
        self.gate_up = _stacked(glu.gate_proj, glu.up_proj)
        self.down_proj = glu.down_proj
        self.activation = glu.activation
        mx.eval(self.gate_up.parameters())

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= 64  # as SwitchGLU: many tokens are sorted by expert first
        idx, inv_order = indices, None
        if do_sort:
            x, idx, inv_order = gather_sort(x, indices)
        x_gate, x_up = mx.split(self.gate_up(x, idx, sorted_indices=do_sort), 2, axis=-1)
        x = self.down_proj(self.activation(x_up, x_gate), idx, sorted_indices=do_sort)
        if do_sort:
            x = scatter_unsort(x, inv_order, indices.shape)
        return x.squeeze(-2)


def fuse(glu: nn.Module) -> nn.Module:
    """``glu`` fused when it is a plain ``SwitchGLU`` of matching gate and up
    projections (and fusing is on); anything else as it is."""
    if not _enabled or type(glu) is not SwitchGLU:
        return glu
    gate, up = glu.gate_proj, glu.up_proj
    if type(gate) is not type(up) or gate.weight.shape != up.weight.shape:
        return glu
    if isinstance(gate, QuantizedSwitchLinear) and (
            (gate.group_size, gate.bits, gate.mode) != (up.group_size, up.bits, up.mode)
            or getattr(gate, "global_scale", None) is not None or (gate.biases is None) != (up.biases is None)):
        return glu
    return FusedSwitchGLU(glu)
