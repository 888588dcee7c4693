"""Cost model: per layer, experts spread across nodes or the whole layer on one node.

Expert mode costs every MoE layer one round trip (the router stops its graph,
the nodes answer); a pipeline stage costs one round trip per span of whole
layers. From each node's measured round-trip time and per-layer compute
(``measure``), ``choose`` predicts decode tokens/s at batch 1 and 8 for the
plans that fit the nodes' memory and picks one (``--mode expert|pipeline|auto``).

The prediction per decode step: each stage span ``rtt + layers * layer_s``;
each expert-mode MoE layer ``rtt + layer_s`` (attention on the router and
experts on the nodes add up to about one layer); each dense layer left on the
router ``layer_s``. Embedding, lm head and sampling are left out, as is KV
cache memory (budgets count weights only).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import numpy as np

from .errors import PlacementError, UnavailableError
from .models import Adapter
from .placement import Load, NodeBudget, Placement, balanced, contiguous

logger = logging.getLogger(__name__)

MODES = ("expert", "pipeline", "auto")
BATCHES = (1, 8)
# used where nothing was measured (``expertmesh plan`` without --rtt-us/--layer-us)
DEFAULT_RTT_S = 200e-6
DEFAULT_LAYER_S = {1: 600e-6, 8: 1000e-6}


@dataclass
class NodeCost:
    name: str
    memory_bytes: int
    rtt_s: float = DEFAULT_RTT_S                                                  # data-plane round trip
    layer_s: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_LAYER_S))  # batch -> one layer's decode step


@dataclass
class Plan:
    mode: str                                  # "expert", "pipeline", or "mixed" (stages + expert layers)
    stages: dict[str, list[tuple[int, int]]]   # node -> spans [start, end) of whole layers
    placement: Placement                       # routed experts of the MoE layers outside the stages
    tps: dict[int, float]                      # batch -> predicted decode tokens/s
    alternatives: dict[str, dict[int, float]] = field(default_factory=dict)  # every plan that fits -> its tok/s

    def describe(self, num_layers: int) -> list[str]:
        """Lines for people: the chosen mode per layer span and the predictions."""
        def rate(tps):
            return ", ".join(f"{tps[b]:.1f} tok/s at batch {b}" for b in BATCHES)

        lines = [f"mode {self.mode}: predicted decode {rate(self.tps)}"]
        spans = sorted((a, b, n) for n, s in self.stages.items() for a, b in s)
        covered = 0
        for a, b, n in spans:
            lines.append(f"  {_layers(a, b)}: whole layers on {n} (pipeline stage)")
            covered = b
        if covered < num_layers:
            lines.append(f"  {_layers(covered, num_layers)}: experts spread across "
                         f"{', '.join(self.placement.nodes)}, attention on the router")
        for mode, tps in self.alternatives.items():
            if mode != self.mode:
                lines.append(f"  ({mode}: {rate(tps)})")
        return lines


def _layers(a: int, b: int) -> str:
    return f"layer {a}" if b - a == 1 else f"layers {a}-{b - 1}"


def step_seconds(nodes: list[NodeCost], stages: dict, expert_layers: int, dense_layers: int, batch: int) -> float:
    by_name = {n.name: n for n in nodes}
    t = sum(by_name[n].rtt_s + (b - a) * by_name[n].layer_s[batch] for n, s in stages.items() for a, b in s)
    layer = statistics.mean(n.layer_s[batch] for n in nodes)
    return t + expert_layers * (max(n.rtt_s for n in nodes) + layer) + dense_layers * layer


def _plan(mode: str, nodes: list[NodeCost], adapter: Adapter, tensors: dict, stages: dict, left: list[int],
          replicas: int, load: Load | None) -> Plan:
    covered = {l for s in stages.values() for a, b in s for l in range(a, b)}
    expert_layers = [l for l in adapter.moe_layers if l not in covered]
    dense = adapter.args.num_hidden_layers - len(covered) - len(expert_layers)
    if expert_layers:
        budgets = [NodeBudget(n.name, m) for n, m in zip(nodes, left)]
        sizes = {l: adapter.expert_bytes(tensors, l) for l in expert_layers}
        placement = (contiguous(budgets, adapter.num_experts, sizes, replicas) if load is None
                     else balanced(budgets, adapter.num_experts, sizes, load))
    else:
        placement = Placement([n.name for n in nodes], {})
    tps = {b: b / step_seconds(nodes, stages, len(expert_layers), dense, b) for b in BATCHES}
    return Plan(mode if expert_layers or mode == "expert" else "pipeline", stages, placement, tps)


def _staged(nodes: list[NodeCost], adapter: Adapter, tensors: dict, replicas: int, load: Load | None) -> Plan:
    """Contiguous spans sized by each node's speed, as far as its memory goes;
    layers left over keep their experts spread (a mixed plan)."""
    L = adapter.args.num_hidden_layers
    sizes = [adapter.layer_bytes(tensors, l) for l in range(L)]
    speed = np.array([1.0 / n.layer_s[1] for n in nodes])
    bounds = np.rint(np.cumsum(speed) / speed.sum() * L).astype(int)
    if L >= len(nodes):  # every node a layer at least: a node left idle helps nobody, and timings are noisy
        for i in range(len(nodes)):
            bounds[i] = min(max(bounds[i], bounds[i - 1] + 1 if i else 1), L - (len(nodes) - 1 - i))
    stages, left, pos = {}, [], 0
    for n, bound in zip(nodes, bounds):
        start, used = pos, 0
        while pos < bound and used + sizes[pos] <= n.memory_bytes:
            used += sizes[pos]
            pos += 1
        if pos > start:
            stages[n.name] = [(start, pos)]
        left.append(n.memory_bytes - used)
    if not stages:
        raise PlacementError("no node has the memory for a single whole layer")
    return _plan("mixed", nodes, adapter, tensors, stages, left, replicas, load)


def choose(mode: str, nodes: list[NodeCost], adapter: Adapter, tensors: dict, replicas: int = 1,
           load: Load | None = None) -> Plan:
    """The plan for ``mode``: ``expert`` and ``pipeline`` force it (pipeline
    keeps experts spread for layers no node has room for), ``auto`` takes the
    one predicted fastest at batch 1. Experts spread get ``replicas`` copies
    where memory allows (stage layers have one copy: their node's), or, given
    their ``load`` (popularity), are placed by ``placement.balanced``.

    Raises:
        PlacementError: nothing fits the nodes' memory, or ``mode`` is unknown.
    """
    if mode not in MODES:
        raise PlacementError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")
    plans, errors = {}, []
    for name, make in (("expert", lambda: _plan("expert", nodes, adapter, tensors, {},
                                                  [n.memory_bytes for n in nodes], replicas, load)),
                       ("pipeline", lambda: _staged(nodes, adapter, tensors, replicas, load))):
        if mode in (name, "auto"):
            try:
                plans[name] = make()
            except PlacementError as e:
                errors.append(e)
    if not plans:
        raise errors[0]
    best = max(plans.values(), key=lambda p: p.tps[1])
    best.alternatives = {p.mode: p.tps for p in plans.values()}
    return best


# --- measuring the nodes ----------------------------------------------------------
def measure(link, adapter: Adapter, timeout: float, pings: int = 20) -> NodeCost:
    """Time one whole layer on the node (its ``Measure`` RPC) and the data-plane
    round trip (``pings`` pings on a connection of our own).

    Raises:
        ExpertmeshError: the node refused or failed the measurement.
    """
    layer = adapter.moe_layers[0]
    m = link.measure(layer, timeout)
    times: list[float] = []
    try:
        with link.dial_data_plane() as plane:
            times = [plane.ping(i + 1, timeout) for i in range(pings + 1)]
    except (OSError, UnavailableError) as e:
        raise UnavailableError(f"{link!r}: the data plane failed while measuring its round trip: {e}") from None
    cost = NodeCost(link.name, link.info.memory_budget_bytes, statistics.median(times[1:]),
                    {1: m.layer_seconds_batch1, 8: m.layer_seconds_batch8})
    logger.info("%r: round trip %.0f us, layer %d decode %.0f us (batch 1) / %.0f us (batch 8)", link,
                cost.rtt_s * 1e6, layer, cost.layer_s[1] * 1e6, cost.layer_s[8] * 1e6)
    return cost
