"""Planner: which nodes hold which routed experts of which layer."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Mapping, Sequence

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
# layer -> expected token-slots per expert (its popularity, e.g. counted by RoutingStats)
Load = Mapping[int, Sequence[float]]


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


def holding(nodes: list[str], held: Mapping[str, Mapping[int, Sequence[int]]],
            like: Mapping[int, np.ndarray]) -> Placement:
    """The placement in which each node holds exactly ``held[node]`` (layer ->
    experts), for the layers and expert count of ``like`` (layer -> owners)."""
    owners = {}
    for l, o in like.items():
        copies = [[i for i, n in enumerate(nodes) if e in held[n].get(l, ())] for e in range(o.shape[0])]
        owners[l] = np.full((o.shape[0], max(1, *map(len, copies))), -1, np.int32)
        for e, c in enumerate(copies):
            owners[l][e, :len(c)] = c
    return Placement(list(nodes), owners)


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


def balanced(nodes: list[NodeBudget], num_experts: int, expert_bytes: dict[int, int], load: Load,
             current: Placement | None = None) -> Placement:
    """Experts placed so that every node expects the same load (token-slots
    routed to its experts) in every layer, within the memory budgets; hot
    experts get copies in spare memory, their load split evenly over the
    copies (as the dispatcher spreads them).

    Per layer each node holds as many primaries as ``contiguous`` gives it,
    so the plan fits wherever a contiguous one does. Copies go first to the
    experts whose share per copy is largest, until no share is above half a
    node's fair share of the layer or spare memory runs out; then all copies
    are placed heaviest first, each on the least-loaded node that can take it
    (LPT), and copies are added while one lowers a layer's busiest node.
    Given the ``current`` placement, a copy stays where it is when that node
    is as good a choice (equal load, or an expert without traffic), so a
    rebalance moves no more than it must.

    Args:
        nodes: the nodes and their memory budgets, in placement order.
        num_experts: routed experts per MoE layer.
        expert_bytes: bytes of one expert, per MoE layer.
        load: layer -> token-slots per expert; layers left out count as idle.
        current: the placement in use (on the same nodes), if any.

    Raises:
        PlacementError: no nodes, one copy of every expert does not fit the
            budgets, or ``load`` is malformed.
    """
    base = contiguous(nodes, num_experts, expert_bytes)
    n = len(nodes)
    weights = {l: _layer_load(load, l, num_experts) for l in expert_bytes}
    free = np.array([max(x.memory_bytes, 0) - base.bytes_of(x.name, expert_bytes) for x in nodes], np.float64)
    copies = _copies(weights, expert_bytes, free.sum(), n)
    held = {l: np.zeros((num_experts, n), bool) for l in expert_bytes}
    for l, o in (current.owners.items() if current is not None else ()):
        if l not in held:
            continue
        rows, cols = np.nonzero(o >= 0)
        held[l][rows, o[rows, cols]] = True
    owners = {l: _place_layer(weights[l], copies[l], np.bincount(base.owners[l][:, 0], minlength=n), free,
                              expert_bytes[l], held[l]) for l in sorted(expert_bytes)}
    placement = Placement(base.nodes, owners)
    _improve(placement, weights, free, expert_bytes)
    return placement


def _layer_load(load: Load, layer: int, num_experts: int) -> np.ndarray:
    w = np.asarray(load.get(layer, np.zeros(num_experts)), np.float64)
    if w.shape != (num_experts,) or not np.isfinite(w).all() or (w < 0).any():
        raise PlacementError(f"the load of layer {layer} must be {num_experts} finite counts >= 0")
    return w


def _copies(weights: dict[int, np.ndarray], expert_bytes: dict[int, int], spare: float,
            n: int) -> dict[int, np.ndarray]:
    """Copies per expert: one more for the largest share per copy, while that
    share is above half a node's fair share of its layer and memory is left."""
    copies = {l: np.ones(w.size, np.int64) for l, w in weights.items()}
    heap = [(-w[e], l, e) for l, w in weights.items() for e in np.flatnonzero(w)]
    heapq.heapify(heap)
    while heap:
        share, l, e = heapq.heappop(heap)
        if -share <= weights[l].sum() / n / 2 or copies[l][e] >= n or expert_bytes[l] > spare:
            continue
        copies[l][e] += 1
        spare -= expert_bytes[l]
        heapq.heappush(heap, (-weights[l][e] / copies[l][e], l, e))
    return copies


def _place_layer(w: np.ndarray, copies: np.ndarray, slots: np.ndarray, free: np.ndarray, cost: int,
                 held: np.ndarray) -> np.ndarray:
    """[E, R] owners: copies heaviest first to the least-loaded node that does
    not hold the expert yet (of equals, one that ``held`` it); an expert's first
    copy takes one of the node's ``slots``, later ones its ``free`` memory (a
    copy that fits nowhere is left out)."""
    E, n = w.size, free.size
    owners = np.full((E, int(copies.max())), -1, np.int32)
    placed = np.zeros(E, np.int64)
    loads, slots = np.zeros(n), slots.copy()
    for e in sorted(range(E), key=lambda e: -w[e] / copies[e]):  # stable: ties keep expert order
        for _ in range(copies[e]):
            primary = placed[e] == 0
            ok = (slots > 0) if primary else (free >= cost)
            ok[owners[e, :placed[e]]] = False
            if not ok.any():
                break
            cost_of = np.where(ok, loads if w[e] > 0 else 0.0, np.inf)
            to = int(np.lexsort((~held[e], cost_of))[0])
            owners[e, placed[e]] = to
            placed[e] += 1
            loads[to] += w[e] / copies[e]
            if primary:
                slots[to] -= 1
            else:
                free[to] -= cost
    return owners


def balance_ratio(node_tokens: np.ndarray) -> float:
    """mean/max of node load per layer ([layers, nodes]), averaged over the layers
    that saw traffic; 1.0 is perfectly even, 1/nodes is one node doing all (0 when idle)."""
    busy = node_tokens[node_tokens.max(axis=1) > 0]
    if busy.size == 0:
        return 0.0
    return float((busy.mean(axis=1) / busy.max(axis=1)).mean())


def expected_balance(placement: Placement, load: Load) -> float:
    """The balance ratio ``placement`` would see on traffic like ``load``."""
    loads = node_load(placement, load)
    return balance_ratio(np.array([loads[l] for l in sorted(loads)]))


def node_load(placement: Placement, load: Load) -> dict[int, np.ndarray]:
    """Layer -> expected token-slots per node, each expert's load split evenly over its copies."""
    n = len(placement.nodes)
    return {l: _layer_node_load(o, _layer_load(load, l, o.shape[0]), n) for l, o in placement.owners.items()}


def _layer_node_load(owners: np.ndarray, w: np.ndarray, n: int) -> np.ndarray:
    held = owners >= 0
    copies = held.sum(axis=1)
    return np.bincount(owners[held], weights=np.repeat(w / np.maximum(copies, 1), copies), minlength=n)


def _improve(placement: Placement, weights: dict[int, np.ndarray], free: np.ndarray,
             expert_bytes: dict[int, int]) -> None:
    """Add copies while one lowers a layer's busiest node, the least even layer
    first, until each layer is within 0.1% of even or memory runs out."""
    n = len(placement.nodes)
    loads = node_load(placement, weights)

    def best(l):
        if loads[l].max() <= 0 or loads[l].mean() / loads[l].max() >= 0.999:
            return None
        return _best_copy(placement, l, weights[l], loads[l], free >= expert_bytes[l])

    moves = {l: best(l) for l in placement.owners}
    while True:
        moves = {l: m for l, m in moves.items() if m is not None}
        if not moves:
            return
        l = max(moves, key=lambda l: moves[l][0] - loads[l].mean() / loads[l].max())
        _, e, to = moves[l]
        if free[to] >= expert_bytes[l]:  # else another layer's copy took the room: plan this layer again
            placement.add(l, e, to)
            free[to] -= expert_bytes[l]
            loads[l] = _layer_node_load(placement.owners[l], weights[l], n)
        moves[l] = best(l)


def _best_copy(placement: Placement, layer: int, w: np.ndarray, loads: np.ndarray, room: np.ndarray):
    """``(ratio after, expert, node)`` of the copy that most lowers the busiest
    node of ``layer``, or None when none does."""
    o = placement.owners[layer]
    busiest = int(np.argmax(loads))
    best = None
    for e in np.flatnonzero((o == busiest).any(axis=1) & (w > 0)):
        holders = o[e][o[e] >= 0]
        c = holders.size
        for to in np.flatnonzero(room):
            if to in holders:
                continue
            after = loads.copy()
            after[holders] -= w[e] / c - w[e] / (c + 1)
            after[to] += w[e] / (c + 1)
            key = (after.max(), float((after ** 2).sum()))
            if key[0] < loads.max() - 1e-9 and (best is None or key < best[0]):
                best = (key, int(e), int(to))
    if best is None:
        return None
    after = best[0]
    return (loads.mean() / after[0], best[1], best[2])
