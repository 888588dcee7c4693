"""Live rebalancing: re-plan from the traffic seen since the placement last
changed, and move experts while generations run.

Any holder of an expert computes the same output, so a move never changes
results if it is ordered: (1) every node loads the union of its old and new
experts (Assign takes the whole set to hold), (2) the cluster's owner
publishes the new placement, which the dispatcher routes by from its next
layer, (3) once no layer routes by the old one, every node drops the experts
it no longer holds. Between (1) and (3) both placements are served by the
nodes. Nodes without room for old and new at once go in rounds of the same
three steps. A rebalance is one command of the owner (router/state.py): it
runs between recoveries and re-admissions, never beside them.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from .. import placement as planner
from ..errors import ExpertmeshError, PlacementError, UnavailableError
from ..v1 import expertmesh_pb2 as pb
from .state import ClusterState
from .stats import RoutingStats

logger = logging.getLogger(__name__)

Report = Callable[[pb.RebalanceProgress], None]
# (epoch, timeout) -> True once no layer routes by an older snapshot (``Dispatcher.wait_unused``)
WaitUnused = Callable[[int, float], bool]


class Rebalancer:
    """Rebalances one router's mesh: on request (``rebalance``) or, with
    ``watch``, whenever the live balance ratio falls below a threshold."""

    def __init__(self, state: ClusterState, routing: RoutingStats, num_experts: int, wait_unused: WaitUnused,
                 switch_timeout: float):
        self.state, self.routing, self.num_experts = state, routing, num_experts
        self.wait_unused, self.switch_timeout = wait_unused, switch_timeout
        self._running = False  # one rebalance at a time
        self._claim = threading.Lock()  # only to test and set ``_running``
        self._since = routing.totals()  # counts when the placement last changed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = 0  # rebalances that moved experts
        self._moved = threading.Condition()

    def wait(self, done: int, timeout: float) -> bool:
        """Wait until ``done`` rebalances have moved experts; False on timeout."""
        with self._moved:
            return self._moved.wait_for(lambda: self.done >= done, timeout)

    def window(self) -> tuple[dict[int, np.ndarray], np.ndarray, int]:
        """Since the placement last changed (or the stats were reset): layer ->
        token-slots per expert, [layers, nodes] token-slots, tokens."""
        now = self.routing.totals()
        if any((a < b).any() for a, b in zip(now, self._since)):  # reset since: count from zero
            self._since = tuple(np.zeros_like(a) for a in now)
        experts, nodes, tokens = (a - b for a, b in zip(now, self._since))
        layers = self.routing.moe_layers
        return {l: experts[i] for i, l in enumerate(layers)}, nodes, int(tokens.max(initial=0))

    def rebalance(self, report: Report, dry_run: bool = False, threshold: float = 0.0, min_tokens: int = 0) -> None:
        """Re-plan from the traffic since the last change and move what the plan moves.

        ``report`` hears each step (``RebalanceProgress``).

        Raises:
            UnavailableError: a rebalance is running already, a node is down,
                or a node failed to load or drop experts.
            PlacementError: the nodes are too full to swap experts (the mesh
                keeps serving from what was reached).
        """
        with self._claim:
            if self._running:
                raise UnavailableError("a rebalance is running already: try again when it is done")
            self._running = True
        try:
            self.state.run(lambda: self._rebalance(report, dry_run, threshold, min_tokens))
        finally:
            self._running = False

    def _rebalance(self, report: Report, dry_run: bool, threshold: float, min_tokens: int) -> None:
        load, node_tokens, tokens = self.window()
        before = planner.balance_ratio(node_tokens)
        skip = ""
        if tokens == 0 or tokens < min_tokens:
            skip = (f"{tokens} tokens went through the model since the placement last changed; "
                    f"waiting for {max(min_tokens, 1)}")
        elif threshold and before >= threshold:
            skip = f"the balance ratio {before:.3f} is not below the threshold {threshold:g}"
        if skip:
            report(pb.RebalanceProgress(phase=pb.REBALANCE_SKIPPED, balance_before=before, message=skip))
            return
        snap = self.state.snapshot
        down = [n.name for n in snap.nodes if n.down]
        if down:
            raise UnavailableError(f"{', '.join(down)} down: rebalance once every node is up")
        old = snap.placement
        if not old.owners:
            report(pb.RebalanceProgress(phase=pb.REBALANCE_SKIPPED, balance_before=before,
                                        message="every layer is a pipeline stage: no experts are spread"))
            return
        new = planner.balanced(self._budgets(), self.num_experts, self.state.expert_bytes, load, old)
        planned = planner.expected_balance(new, load)
        moves = _moves(old, new)
        report(pb.RebalanceProgress(phase=pb.REBALANCE_PLANNED, balance_before=before, balance_planned=planned,
                                    moves=moves))
        if dry_run:
            return
        if not moves or planned <= planner.expected_balance(old, load) + 1e-9:
            report(pb.RebalanceProgress(phase=pb.REBALANCE_SKIPPED, balance_before=before, balance_planned=planned,
                                        message="the placement is already as even as the plan"))
            return
        try:
            self._move(new, report)
        finally:  # count afresh, also after a failed try: the automatic mode waits for new traffic
            self._since = self.routing.totals()
        with self._moved:
            self.done += 1
            self._moved.notify_all()
        report(pb.RebalanceProgress(phase=pb.REBALANCE_DONE, balance_before=before, balance_planned=planned,
                                    message=f"{len(moves)} experts moved or copied; balance ratio {before:.3f} "
                                            f"before, {planned:.3f} expected on the same traffic"))

    def _move(self, new: planner.Placement, report: Report) -> None:
        """Go from what the nodes hold to ``new`` (inside the owner's command).

        Each round, every node loads what it lacks as far as its memory
        allows; then, once traffic no longer goes to them, nodes drop the
        experts a node of the new plan already holds. With room for old and
        new at once that is one round: load, switch, drop.

        Raises:
            PlacementError: no round can go on (the nodes are too full to swap
                experts); the mesh keeps serving from what it reached.
        """
        nodes = self.state.snapshot.nodes
        cost = self.state.expert_bytes
        budget = {b.name: b.memory_bytes for b in self._budgets()}
        held = {n.name: _pairs(n.experts) for n in nodes}
        target = {n.name: _pairs(new.experts_of(n.name)) for n in nodes}
        rounds = 0
        while held != target:
            rounds += 1
            grown = {}
            for name, have in held.items():
                room = budget[name] - sum(cost[l] for l, _ in have)
                adds = set()
                for l, e in sorted(target[name] - have):
                    if cost[l] <= room:
                        adds.add((l, e))
                        room -= cost[l]
                if adds:
                    grown[name] = have | adds
            self._assign(grown, pb.REBALANCE_LOADING, report, rounds)
            held.update(grown)
            keeps = {t: held[t] & target[t] for t in held}
            shrunk = {name: {(l, e) for l, e in have if (l, e) in target[name]
                             or not any((l, e) in keeps[t] for t in keeps if t != name)}
                      for name, have in held.items()}
            shrunk = {name: have for name, have in shrunk.items() if have != held[name]}
            if not grown and not shrunk:
                left = sum(len(target[n] - held[n]) for n in held)
                self._switch(planner.holding(new.nodes, {n: _experts(held[n]) for n in new.nodes}, new.owners),
                             report, rounds)  # use the copies loaded so far
                raise PlacementError(
                    f"rebalancing stopped after {rounds - 1} rounds: {left} expert copies still to load, and the "
                    "nodes lack the memory to load them before others drop theirs (give nodes more --memory-gb); "
                    "the mesh serves from what it reached")
            if not shrunk:
                continue
            now = {**held, **shrunk}
            step = new if now == target else planner.holding(
                new.nodes, {n: _experts(now[n]) for n in new.nodes}, new.owners)
            self._switch(step, report, rounds)
            self._assign(shrunk, pb.REBALANCE_DROPPING, report, rounds)
            held.update(shrunk)
        if self.state.snapshot.placement is not new:  # the last round only added copies
            self._switch(new, report, rounds)

    def _budgets(self) -> list[planner.NodeBudget]:
        """Each node's memory for spread experts: its budget less its pipeline stages."""
        return [planner.NodeBudget(n.name, n.link.info.memory_budget_bytes - n.stage_bytes)
                for n in self.state.snapshot.nodes]

    def _switch(self, placement: planner.Placement, report: Report, rounds: int) -> None:
        """Publish ``placement``; return once no layer routes by the one before.

        Raises:
            UnavailableError: a running layer did not finish in time (nothing is dropped then).
        """
        snap = self.state.switch(placement)
        report(pb.RebalanceProgress(phase=pb.REBALANCE_SWITCHED, round=rounds))
        if not self.wait_unused(snap.epoch, self.switch_timeout):
            raise UnavailableError(f"the running layer did not finish within {self.switch_timeout:g}s")

    def _assign(self, sets: dict[str, set[tuple[int, int]]], phase: int, report: Report, rounds: int) -> None:
        """Assign the nodes named in ``sets`` their sets, in parallel (the owner records what they hold)."""
        def progress(node: str, p: pb.AssignProgress) -> None:
            report(pb.RebalanceProgress(phase=phase, node=node, loaded_bytes=p.loaded_bytes,
                                        total_bytes=p.total_bytes, round=rounds))
        self.state.assign_sets({name: _experts(pairs) for name, pairs in sets.items()}, progress)

    # --- automatic mode --------------------------------------------------------
    def watch(self, threshold: float, interval: float, min_tokens: int) -> None:
        """Every ``interval`` seconds, rebalance when the balance ratio since the
        last change is below ``threshold`` and ``min_tokens`` tokens went through."""
        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.rebalance(_log, threshold=threshold, min_tokens=min_tokens)
                except ExpertmeshError as e:
                    logger.warning("automatic rebalance failed: %s", e)
                except Exception:  # keep watching: the next interval may succeed
                    logger.exception("automatic rebalance failed")
        self._thread = threading.Thread(target=run, name="rebalance", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.state.assign_timeout)


def _pairs(experts: dict[int, list[int]]) -> set[tuple[int, int]]:
    return {(l, e) for l, ids in experts.items() for e in ids}


def _experts(pairs: set[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, e in sorted(pairs):
        out.setdefault(l, []).append(e)
    return out


def _moves(old: planner.Placement, new: planner.Placement) -> list[pb.ExpertMove]:
    out = []
    for l in sorted(new.owners):
        for e in range(new.owners[l].shape[0]):
            before, after = sorted(old.holders(l, e)), sorted(new.holders(l, e))
            if before != after:
                out.append(pb.ExpertMove(layer=l, expert=e, before=[old.nodes[i] for i in before],
                                         after=[new.nodes[i] for i in after]))
    return out


def _log(p: pb.RebalanceProgress) -> None:
    if p.phase == pb.REBALANCE_SKIPPED:
        logger.debug("automatic rebalance skipped: %s", p.message)
    elif p.phase == pb.REBALANCE_DONE:
        logger.info("automatic rebalance: %s", p.message)
