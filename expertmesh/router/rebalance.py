"""Live rebalancing: re-plan from the traffic seen since the placement last
changed, and move experts while generations run.

Any holder of an expert computes the same output, so a move never changes
results if it is ordered: (1) every node loads the union of its old and new
experts (Assign takes the whole set to hold), (2) the dispatcher switches to
the new placement between two layers, (3) every node drops the experts it no
longer holds. Between (1) and (3) both placements are served by the nodes,
so the layer running at the switch finishes on the old one.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

import numpy as np

from .. import placement as planner
from ..errors import ExpertmeshError, PlacementError, UnavailableError
from ..v1 import expertmesh_pb2 as pb

if TYPE_CHECKING:
    from .router import Router

logger = logging.getLogger(__name__)

Report = Callable[[pb.RebalanceProgress], None]


class Rebalancer:
    """Rebalances one router's mesh: on request (``rebalance``) or, with
    ``watch``, whenever the live balance ratio falls below a threshold."""

    def __init__(self, router: Router):
        self.router = router
        self._running = threading.Lock()  # one rebalance at a time
        self._since = router.routing.totals()  # counts when the placement last changed
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
        now = self.router.routing.totals()
        if any((a < b).any() for a, b in zip(now, self._since)):  # reset since: count from zero
            self._since = tuple(np.zeros_like(a) for a in now)
        experts, nodes, tokens = (a - b for a, b in zip(now, self._since))
        layers = self.router.routing.moe_layers
        return {l: experts[i] for i, l in enumerate(layers)}, nodes, int(tokens.max(initial=0))

    def rebalance(self, report: Report, dry_run: bool = False, threshold: float = 0.0, min_tokens: int = 0) -> None:
        """Re-plan from the traffic since the last change and move what the plan moves.

        ``report`` hears each step (``RebalanceProgress``).

        Raises:
            UnavailableError: a rebalance is running already, a node is down,
                or a node failed to load or drop experts.
            PlacementError: a node lacks the memory to hold its old and new
                experts at once.
        """
        if not self._running.acquire(blocking=False):
            raise UnavailableError("a rebalance is running already: try again when it is done")
        try:
            self._rebalance(report, dry_run, threshold, min_tokens)
        finally:
            self._running.release()

    def _rebalance(self, report: Report, dry_run: bool, threshold: float, min_tokens: int) -> None:
        load, node_tokens, tokens = self.window()
        before = planner.balance_ratio(node_tokens)
        skip = ""
        if tokens == 0 or tokens < min_tokens:
            skip = f"{tokens} tokens went through the model since the placement last changed; waiting for {max(min_tokens, 1)}"
        elif threshold and before >= threshold:
            skip = f"the balance ratio {before:.3f} is not below the threshold {threshold:g}"
        if skip:
            report(pb.RebalanceProgress(phase=pb.REBALANCE_SKIPPED, balance_before=before, message=skip))
            return
        membership = self.router.membership
        with membership._lock:  # no re-plan or re-admission meanwhile
            down = [m.name for m in membership.members if m.down]
            if down:
                raise UnavailableError(f"{', '.join(down)} down: rebalance once every node is up")
            old = membership.placement
            budgets = [planner.NodeBudget(m.name, m.link.info.memory_budget_bytes) for m in membership.members]
            new = planner.balanced(budgets, self.router.adapter.num_experts, membership.expert_bytes, load, old)
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
            self._move(new, report)
            self._since = self.router.routing.totals()
        with self._moved:
            self.done += 1
            self._moved.notify_all()
        report(pb.RebalanceProgress(phase=pb.REBALANCE_DONE, balance_before=before, balance_planned=planned,
                                    message=f"{len(moves)} experts moved or copied; balance ratio {before:.3f} "
                                            f"before, {planned:.3f} expected on the same traffic"))

    def _move(self, new: planner.Placement, report: Report) -> None:
        """Load the union, switch, drop (hold the membership lock)."""
        membership, router = self.router.membership, self.router
        budget = {m.name: m.link.info.memory_budget_bytes for m in membership.members}
        union = {}
        for m in membership.members:
            wanted = new.experts_of(m.name)
            union[m.name] = {l: sorted({*m.experts.get(l, []), *wanted.get(l, [])}) for l in {*m.experts, *wanted}}
            need = sum(len(e) * membership.expert_bytes[l] for l, e in union[m.name].items())
            if need > budget[m.name]:
                raise PlacementError(
                    f"node {m.name} would hold {planner.size(need)} while its old and new experts are both loaded, "
                    f"over its {planner.size(budget[m.name])} budget: nothing moved")
        old = {m.name: m.experts for m in membership.members}
        try:
            self._assign(union, pb.REBALANCE_LOADING, report)
            router.dispatcher.switch(new, timeout=2 * router.config.forward_timeout)
        except ExpertmeshError:
            self._assign(old, pb.REBALANCE_DROPPING, report, quiet=True)  # give the memory back
            raise
        membership.placement = router.placement = new
        report(pb.RebalanceProgress(phase=pb.REBALANCE_SWITCHED))
        self._assign({m.name: new.experts_of(m.name) for m in membership.members}, pb.REBALANCE_DROPPING, report)

    def _assign(self, sets: dict[str, dict[int, list[int]]], phase: int, report: Report, quiet: bool = False) -> None:
        """Assign every member whose set changes its set, in parallel; record it."""
        membership = self.router.membership
        errors: list[ExpertmeshError] = []

        def progress(node: str, p: pb.AssignProgress) -> None:
            report(pb.RebalanceProgress(phase=phase, node=node, loaded_bytes=p.loaded_bytes,
                                        total_bytes=p.total_bytes))

        def assign(member) -> None:
            try:
                member.link.assign(membership.config_hash, sets[member.name], membership.config.assign_timeout,
                                   progress)
                member.link.get_info()
                member.experts = sets[member.name]
            except ExpertmeshError as e:
                errors.append(e)

        changing = [m for m in membership.members if _held(sets[m.name]) != _held(m.experts)]
        threads = [threading.Thread(target=assign, args=(m,), name=f"rebalance-{m.name}") for m in changing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors and not quiet:
            raise UnavailableError(f"rebalancing: {errors[0]}")

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
        self._thread = threading.Thread(target=run, name="rebalance", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.router.config.assign_timeout)


def _held(experts: dict[int, list[int]]) -> dict[int, list[int]]:
    return {l: sorted(e) for l, e in experts.items() if e}


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
