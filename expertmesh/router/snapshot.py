"""The cluster's state as one immutable value: who holds what, and who is up.

``ClusterState`` (router/state.py) owns it and publishes a new ``Snapshot``
(one reference swap) after the nodes confirm a change; the dispatcher and
the stage runtime read the current one at each layer or step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Mapping

from ..placement import Placement
from .link import NodeLink

Experts = Mapping[int, tuple[int, ...]]  # layer -> expert ids (read-only)
Span = tuple[int, int]                   # whole layers [start, end)


def frozen_experts(experts: Mapping[int, list[int] | tuple[int, ...]]) -> Experts:
    return MappingProxyType({l: tuple(e) for l, e in experts.items()})


@dataclass(frozen=True)
class NodeState:
    """One node of the plan as the owner last confirmed it."""

    name: str                                  # its name in the plan
    link: NodeLink                             # replaced when the node comes back
    experts: Experts = field(default_factory=lambda: frozen_experts({}))  # what it holds (confirmed by Assign)
    spans: tuple[Span, ...] = ()               # pipeline stage spans it runs (confirmed by AssignStages)
    stage_bytes: int = 0                       # weights of those spans
    error: str = ""                            # the owner's verdict that it is down (left mDNS, taken over)

    @property
    def down(self) -> bool:
        """The owner's verdict, or the link's own: the transport marks it the moment the node fails."""
        return bool(self.error) or self.link.down

    def held(self) -> dict[int, list[int]]:
        """``experts`` as a fresh ``layer -> [ids]`` (what ``Assign`` takes)."""
        return {l: list(e) for l, e in self.experts.items()}

    def free_bytes(self, expert_bytes: Mapping[int, int]) -> int:
        """Its memory budget less its stages and experts."""
        return self.link.info.memory_budget_bytes - self.stage_bytes - sum(
            len(e) * expert_bytes[l] for l, e in self.experts.items())


@dataclass(frozen=True)
class Snapshot:
    """Placement (expert -> node indices), every node's holdings, stage spans
    and liveness, at one ``epoch``. Never changed once published: a change
    is a new snapshot (``changed``)."""

    epoch: int
    placement: Placement
    nodes: tuple[NodeState, ...]

    def __post_init__(self):
        for owners in self.placement.owners.values():
            owners.setflags(write=False)  # copy (copy.deepcopy) to plan a change

    @classmethod
    def of(cls, placement: Placement, links: list[NodeLink]) -> "Snapshot":
        """The first snapshot: each link holding what ``placement`` gives its name."""
        return cls(0, placement, tuple(NodeState(l.name, l, frozen_experts(placement.experts_of(l.name)))
                                       for l in links))

    def changed(self, placement: Placement | None = None, nodes: Mapping[str, NodeState] = MappingProxyType({})
                ) -> "Snapshot":
        """The next snapshot: ``placement`` and the nodes in ``nodes`` (by name) replaced."""
        return Snapshot(self.epoch + 1, self.placement if placement is None else placement,
                        tuple(nodes.get(n.name, n) for n in self.nodes))

    def node(self, name: str) -> NodeState:
        return self._by_name[name]

    def node_of(self, link: NodeLink) -> NodeState | None:
        """The node ``link`` is the current link of (None: a link replaced since)."""
        return next((n for n in self.nodes if n.link is link), None)

    @cached_property
    def _by_name(self) -> dict[str, NodeState]:
        return {n.name: n for n in self.nodes}

    @cached_property
    def links(self) -> tuple[NodeLink, ...]:
        """The link of each placement node index."""
        return tuple(self._by_name[n].link for n in self.placement.nodes)

    @cached_property
    def stages(self) -> dict[int, tuple[Span, NodeState]]:
        """First layer -> (span, the node that runs it)."""
        return {a: ((a, b), n) for n in self.nodes for a, b in n.spans}

    def stage_link(self, start: int) -> NodeLink:
        """The link of the node running the span that starts at ``start``."""
        return self.stages[start][1].link

    def with_node(self, node: NodeState, **change) -> "Snapshot":
        """The next snapshot with ``node`` changed as ``dataclasses.replace`` does."""
        return self.changed(nodes={node.name: replace(node, **change)})
