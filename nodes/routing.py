"""What a pipeline stage's gates route, counted where they run: on the node.

In expert mode the router runs every gate and counts what it sends; a span
of whole layers runs its gates here, so each MoE block of a span is wrapped
in a ``CountedBlock`` that keeps the expert ids its gate chose, and every
stage reply carries their token-slot counts (``StageRouting``) back to the
router's statistics. The ids come out of the same compiled decode step as
the block's output and are joined into one array, read back with the span's
output in one buffer; each layer's offset (``layer * num_experts``) is added
on the host, since a constant inside a compiled step is written into its
fused kernel's source, and on MLX's CUDA backend every layer's own constant
was a kernel compiled anew (the first token of a 48-layer span took minutes).
Per request: two concatenations and one ``bincount``.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from expertmesh import compiled
from expertmesh.models import Adapter
from expertmesh.v1 import expertmesh_pb2 as pb


class _Box:
    """Plain Python state on a module (an array or list attribute would join its parameters)."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value


class _Tap(nn.Module):
    """Stands where a block's ``switch_mlp`` was: the same call, keeping the expert ids."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts
        self.indices = _Box()

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        self.indices.value = indices
        return self.experts(x, indices)


class CountedBlock(nn.Module):
    """A MoE block, compiled for decode steps, that notes the experts chosen
    per call (flat; its layer's ``offset`` is added by ``SpanRouting.take``)."""

    def __init__(self, block: nn.Module, offset: int):
        super().__init__()
        block.switch_mlp = _Tap(block.switch_mlp)
        self.block = block
        self.offset = _Box(offset)
        self.chosen = _Box([])  # the ids of each call since ``SpanRouting.begin``
        self._step = compiled.for_decode(self._run)

    def _run(self, x: mx.array) -> tuple[mx.array, mx.array]:
        y = self.block(x)
        return y, self.block.switch_mlp.indices.value.reshape(-1).astype(mx.int32)

    def __call__(self, x: mx.array) -> mx.array:
        y, indices = (self._step if x.shape[1] == 1 else self._run)(x)
        self.chosen.value.append(indices)
        return y


class SpanRouting:
    """The counted MoE blocks of one span: ``begin`` a request, evaluate
    ``pending()`` with its output, then ``take()`` the counts of what it read back."""

    def __init__(self, layers: list[nn.Module], start: int, adapter: Adapter):
        """Wrap the blocks of ``layers`` (decoder layers ``start``, ``start + 1``, ...)
        in place: MoE ones counted, the others compiled for decode steps only."""
        self.num_experts = adapter.num_experts
        self.blocks: dict[int, CountedBlock] = {}
        attr = adapter.block_attr
        for i, layer in enumerate(layers):
            block = getattr(layer, attr)
            if adapter.is_moe_layer(start + i) and hasattr(block, "switch_mlp"):
                self.blocks[start + i] = CountedBlock(block, (start + i) * self.num_experts)
                setattr(layer, attr, self.blocks[start + i])
            else:
                setattr(layer, attr, compiled.DecodeStep(block, 1))

    def begin(self) -> None:
        for block in self.blocks.values():
            block.chosen.value = []

    def _chosen(self) -> list[tuple[int, mx.array]]:
        """(layer offset, expert ids) of each MoE block call since ``begin``, in order."""
        return [(block.offset.value, a) for block in self.blocks.values() for a in block.chosen.value]

    def pending(self) -> mx.array | None:
        """The expert ids of this request, joined (None when no MoE block ran), to evaluate with the span's output."""
        chosen = self._chosen()
        return mx.concatenate([a for _, a in chosen]) if chosen else None

    def take(self, ids: np.ndarray | None) -> pb.StageRouting:
        """Token-slots per ``layer * num_experts + expert`` of the evaluated
        ``pending()`` ids, as the reply carries them."""
        if ids is None or ids.size == 0:
            return pb.StageRouting()
        chosen = self._chosen()
        per = np.bincount(ids + np.repeat([o for o, _ in chosen], [a.size for _, a in chosen]))
        used = np.flatnonzero(per)
        return pb.StageRouting(slots=used.tolist(), counts=per[used].tolist())
