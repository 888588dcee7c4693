"""Planner: which nodes hold which routed experts of which layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from .errors import PlacementError
from .ranges import compact


def size(n: float) -> str:
    """Bytes for people: "16.13 GB", "0.34 MB"."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.2f} MB"


@dataclass(frozen=True)
class NodeBudget:
    name: str
    memory_bytes: int


# copies wanted: one count for every expert, or per (layer, expert) (others get one)
Replicas = int | Mapping[tuple[int, int], int]


@dataclass
class Placement:
    """Expert -> nodes, per MoE layer.

    ``owners[layer]`` is ``[num_experts, R]`` node indices into ``nodes``:
    column 0 the primary, then the replicas, -1 where an expert has fewer
    than R copies.
    """

    nodes: list[str]
    owners: dict[int, np.ndarray]
    short: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts given fewer copies than asked

    def holders(self, layer: int, expert: int) -> list[int]:
        return [int(n) for n in self.owners[layer][expert] if n >= 0]

    def experts_of(self, node: str) -> dict[int, list[int]]:
        """Every expert ``node`` holds, replicas included."""
        i = self.nodes.index(node)
        return {l: np.flatnonzero((o == i).any(axis=1)).tolist() for l, o in self.owners.items()}

    def bytes_of(self, node: str, expert_bytes: dict[int, int]) -> int:
        return sum(len(e) * expert_bytes[l] for l, e in self.experts_of(node).items())

    def replicas_of(self, node: str) -> int:
        """How many of ``node``'s experts are not its primaries."""
        i = self.nodes.index(node)
        return sum(int(((o[:, 1:] == i).any(axis=1)).sum()) for o in self.owners.values())

    def missing(self, live: np.ndarray) -> dict[int, list[int]]:
        """Layer -> experts no live node holds (``live``: a bool per node)."""
        out = {}
        for l, o in self.owners.items():
            held = (o >= 0) & live[np.maximum(o, 0)]
            lost = np.flatnonzero(~held.any(axis=1)).tolist()
            if lost:
                out[l] = lost
        return out

    def add(self, layer: int, expert: int, node: int) -> None:
        """One more copy of ``expert`` on ``node`` (a column more when the row is full)."""
        o = self.owners[layer]
        free = np.flatnonzero(o[expert] < 0)
        if free.size == 0:
            o = self.owners[layer] = np.pad(o, ((0, 0), (0, 1)), constant_values=-1)
            free = [o.shape[1] - 1]
        o[expert, free[0]] = node


def describe(experts: dict[int, list[int]]) -> str:
    """``{0: [1, 2], 3: [5]}`` -> "layer 0 experts 1-2; layer 3 expert 5"."""
    return "; ".join(f"layer {l} expert{'s' if len(e) > 1 else ''} {compact(e)}" for l, e in sorted(experts.items()))


def contiguous(nodes: list[NodeBudget], num_experts: int, expert_bytes: dict[int, int],
               replicas: Replicas = 1) -> Placement:
    """Every layer split into contiguous expert ranges proportional to memory,
    then replicas where memory allows.

    The n-th copy of an expert goes to the node n places after its primary
    when that node has room, else to the node with the most room left that
    does not hold it yet; experts that get fewer copies than asked are listed
    in ``Placement.short``.

    Args:
        nodes: the nodes and their memory budgets, in placement order.
        num_experts: routed experts per MoE layer.
        expert_bytes: bytes of one expert, per MoE layer.
        replicas: copies wanted of every expert, or per ``(layer, expert)``.

    Raises:
        PlacementError: no nodes, or one copy of every expert does not fit the budgets.
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
    placement = Placement([n.name for n in nodes], {l: owner[:, None].copy() for l in expert_bytes})
    free = budgets.copy()
    for i, n in enumerate(nodes):
        free[i] -= placement.bytes_of(n.name, expert_bytes)
        if free[i] < 0:
            raise PlacementError(
                f"node {n.name} would hold {size(n.memory_bytes - free[i])} of experts, over its "
                f"{size(n.memory_bytes)} budget")
    _replicate(placement, free, expert_bytes, replicas)
    return placement


def _replicate(placement: Placement, free: np.ndarray, expert_bytes: dict[int, int], replicas: Replicas) -> None:
    """Add copies up to ``replicas``, copy level by copy level, where memory allows."""
    num_experts = next(iter(placement.owners.values())).shape[0]
    want = {l: np.full(num_experts, replicas if isinstance(replicas, int) else 1) for l in placement.owners}
    if not isinstance(replicas, int):
        for (l, e), count in replicas.items():
            want[l][e] = count
    n = len(placement.nodes)
    for copy in range(1, max(int(w.max()) for w in want.values())):
        for l in sorted(placement.owners):
            for e in np.flatnonzero(want[l] > copy):
                held = placement.holders(l, e)
                cost = expert_bytes[l]
                preferred = (held[0] + copy) % n
                candidates = [preferred] + sorted(range(n), key=lambda i: -free[i])
                to = next((i for i in candidates if i not in held and free[i] >= cost), None)
                if to is None:
                    placement.short.setdefault(l, []).append(int(e))
                    continue
                placement.add(l, int(e), to)
                free[to] -= cost
    for l in placement.short:
        placement.short[l] = sorted(set(placement.short[l]))


def take_over(placement: Placement, missing: dict[int, list[int]], free: dict[int, int],
              expert_bytes: dict[int, int]) -> dict[int, dict[int, list[int]]]:
    """Plan the ``missing`` experts onto live nodes (node index -> bytes free),
    each to the node with the most room left; record them in ``placement``.

    Returns:
        node index -> the experts it must load (layer -> experts).

    Raises:
        PlacementError: the live nodes lack the memory; ``placement`` is unchanged.
    """
    left, moves = dict(free), {}
    for l, experts in sorted(missing.items()):
        for e in experts:
            to = max(left, key=lambda i: (left[i], -i), default=None)
            if to is None:
                raise PlacementError(f"no live node is left to hold {describe(missing)}")
            if left[to] < expert_bytes[l]:
                need = sum(len(e) * expert_bytes[l] for l, e in missing.items())
                raise PlacementError(
                    f"no live node holds {describe(missing)}, and the live nodes lack the memory to load "
                    f"them ({size(need)} needed, {size(sum(max(v, 0) for v in free.values()))} free)")
            left[to] -= expert_bytes[l]
            free[to] -= expert_bytes[l]
            moves.setdefault(to, {}).setdefault(l, []).append(e)
    for to, layers in moves.items():
        for l, experts in layers.items():
            for e in experts:
                placement.add(l, e, to)
    return moves
