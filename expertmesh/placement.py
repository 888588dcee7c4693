"""Planner: which node holds which routed experts of which layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlacementError


def size(n: float) -> str:
    """Bytes for people: "16.13 GB", "0.34 MB"."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class NodeBudget:
    name: str
    memory_bytes: int


@dataclass
class Placement:
    """Expert -> node, per MoE layer (each expert on exactly one node)."""

    nodes: list[str]
    owners: dict[int, np.ndarray]  # layer -> [num_experts] index into `nodes`

    def experts_of(self, node: str) -> dict[int, list[int]]:
        i = self.nodes.index(node)
        return {l: np.flatnonzero(o == i).tolist() for l, o in self.owners.items()}

    def bytes_of(self, node: str, expert_bytes: dict[int, int]) -> int:
        return sum(len(e) * expert_bytes[l] for l, e in self.experts_of(node).items())


def contiguous(nodes: list[NodeBudget], num_experts: int, expert_bytes: dict[int, int]) -> Placement:
    """Every layer split into contiguous expert ranges proportional to memory.

    Args:
        nodes: the nodes and their memory budgets, in placement order.
        num_experts: routed experts per MoE layer.
        expert_bytes: bytes of one expert, per MoE layer.

    Raises:
        PlacementError: no nodes, or the experts do not fit the budgets.
    """
    if not nodes:
        raise PlacementError("no nodes to place experts on")
    budgets = np.array([max(n.memory_bytes, 0) for n in nodes], dtype=np.float64)
    need = num_experts * sum(expert_bytes.values())
    if budgets.sum() <= 0 or need > budgets.sum():
        raise PlacementError(
            f"the routed experts need {size(need)} but the nodes offer "
            f"{size(budgets.sum())} ({', '.join(f'{n.name}: {size(n.memory_bytes)}' for n in nodes)})")
    bounds = np.rint(np.cumsum(budgets) / budgets.sum() * num_experts).astype(int)
    owner = np.searchsorted(bounds, np.arange(num_experts), side="right").astype(np.int32)
    placement = Placement([n.name for n in nodes], {l: owner.copy() for l in expert_bytes})
    for n in nodes:
        used = placement.bytes_of(n.name, expert_bytes)
        if used > n.memory_bytes:
            raise PlacementError(
                f"node {n.name} would hold {size(used)} of experts, over its "
                f"{size(n.memory_bytes)} budget")
    return placement
