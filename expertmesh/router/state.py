"""ClusterState: the one owner of who holds what.

Every change of the cluster's state (bring-up, recovery of lost experts,
relocation of a stage span, re-admission of a node that came back, each
step of a rebalance) is a command that the owner's one thread runs in the
order they came. A command calls the nodes, and only once they confirm
publishes the next ``Snapshot`` (one reference swap); a command that fails
leaves the snapshot in force and raises, naming the node. Readers
(``snapshot``) take no lock, and no lock is held across a call to a node;
a call to a node that goes down meanwhile (its link marked by the
dispatcher or the stream) is given up at once, not after its deadline.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import replace
from typing import Callable, Mapping, TypeVar

import numpy as np

from ..checkpoint import Identity
from ..errors import ExpertmeshError, PlacementError, UnavailableError
from ..placement import Placement, describe, take_over
from .link import AssignProgressCallback, NodeLink
from .snapshot import NodeState, Snapshot, Span, frozen_experts

logger = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSE = object()
_POLL_S = 0.05  # how often a command waiting on a node looks whether the node went down


class ClusterState:
    """Owns the cluster's ``Snapshot``; ``run`` queues a command for its thread."""

    def __init__(self, identity: Identity, assign_timeout: float, span_bytes: Callable[[list[Span]], int]):
        self.identity, self.assign_timeout, self.span_bytes = identity, assign_timeout, span_bytes
        self.snapshot: Snapshot | None = None  # the current one: read it, never change it
        self.expert_bytes: dict[int, int] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._queueing = threading.Lock()  # only for queueing: never held while a command runs
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="cluster-state", daemon=True)
        self._thread.start()

    # --- commands -------------------------------------------------------------------
    def run(self, command: Callable[[], T]) -> T:
        """Run ``command`` on the owner's thread after those queued before it;
        its result, or its error. A command's own steps run at once."""
        if threading.current_thread() is self._thread:
            return command()
        done: Future = Future()
        with self._queueing:
            if self._closed:
                raise UnavailableError("the router is shutting down")
            self._commands.put((command, done))
        return done.result()

    def _work(self) -> None:
        while (item := self._commands.get()) is not _CLOSE:
            command, done = item
            try:
                done.set_result(command())
            except BaseException as e:  # the caller hears it
                done.set_exception(e)

    def close(self, timeout: float = 5.0) -> None:
        with self._queueing:
            self._closed = True
            self._commands.put(_CLOSE)
        self._thread.join(timeout)
        while True:  # commands queued behind one still running: their callers must not wait forever
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not _CLOSE:
                item[1].set_exception(UnavailableError("the router is shutting down"))

    def _publish(self, snapshot: Snapshot) -> Snapshot:
        assert threading.current_thread() is self._thread, "only a command publishes"
        self.snapshot = snapshot
        return snapshot

    def _calls(self, calls: Mapping[str, tuple[NodeLink, Callable[[], object]]],
               what: str) -> dict[str, object | ExpertmeshError]:
        """Run the calls to nodes (name -> its link, the call) at once; name ->
        result or error. A node whose link goes down meanwhile is given up on."""
        running = {name: _started(call) for name, (_, call) in calls.items()}
        out: dict[str, object | ExpertmeshError] = {}
        while running:
            for name, done in list(running.items()):
                link = calls[name][0]
                if done.done():
                    error = done.exception()
                    if error is not None and not isinstance(error, ExpertmeshError):
                        raise error
                    out[name] = error if error is not None else done.result()
                elif link.down:
                    out[name] = UnavailableError(f"{link!r} went down during {what} ({link.error})")
                else:
                    continue
                del running[name]
            if running:
                wait(list(running.values()), timeout=_POLL_S, return_when=FIRST_COMPLETED)
        return out

    def _call(self, link: NodeLink, call: Callable[[], T], what: str) -> T:
        result = self._calls({link.name: (link, call)}, what)[link.name]
        if isinstance(result, ExpertmeshError):
            raise result
        return result

    # --- bring-up ---------------------------------------------------------------
    def bring_up(self, links: list[NodeLink], placement: Placement, expert_bytes: dict[int, int],
                 progress: AssignProgressCallback | None = None) -> None:
        """Assign every node its experts (in parallel, ``progress`` hearing each
        node's loading), open its Forward stream, and publish the first snapshot.

        Raises:
            ExpertmeshError: a node refused or failed its assignment.
        """
        def assign(link: NodeLink, experts: dict[int, list[int]]) -> None:
            link.assign(self.identity, experts, self.assign_timeout, progress if experts else None)  # else stages
            link.get_info()
            link.open_stream()

        def command() -> None:
            self.expert_bytes = expert_bytes
            calls = {l.name: (l, lambda l=l: assign(l, placement.experts_of(l.name))) for l in links}
            _raise_first(self._calls(calls, "its assignment"))
            self._publish(Snapshot.of(placement, links))
        self.run(command)

    def bring_up_stages(self, stages: Mapping[str, list[Span]], progress: AssignProgressCallback | None = None) -> None:
        """Load every node's spans of whole layers (in parallel, ``progress``
        hearing each node's loading as "NAME layers A-B").

        Raises:
            ExpertmeshError: a node refused or failed them.
        """
        def command() -> None:
            snap = self.snapshot
            calls = {name: (snap.node(name).link, lambda name=name, spans=spans: self._load_stages(name, spans, progress))
                     for name, spans in stages.items()}
            _raise_first(self._calls(calls, "loading its layers"))
            self._publish(snap.changed(nodes={name: replace(snap.node(name), spans=tuple(spans),
                                                            stage_bytes=self.span_bytes(spans))
                                              for name, spans in stages.items()}))
        self.run(command)

    def _load_stages(self, name: str, spans: list[Span], progress: AssignProgressCallback | None = None) -> None:
        task = f"{name} layers {', '.join(f'{a}-{b - 1}' if b - a > 1 else str(a) for a, b in spans)}"
        self.snapshot.node(name).link.assign_stages(self.identity, spans, self.assign_timeout,
                                                    progress and (lambda update: progress(task, update)))

    # --- recovery ---------------------------------------------------------------
    def recover(self, missing: dict[int, list[int]]) -> Snapshot:
        """Have live nodes with room load the experts no live node holds
        (``missing``: layer -> ids, as the caller saw them); the snapshot then.

        Raises:
            UnavailableError: naming the experts, when the live nodes lack the
                memory or a node fails to load them; the snapshot stays as it was.
        """
        return self.run(self._recover)

    def _recover(self) -> Snapshot:
        snap = self.snapshot
        live = {i: snap.node(n) for i, n in enumerate(snap.placement.nodes) if not snap.node(n).down}
        missing = snap.placement.missing(_mask(snap, live))
        if not missing:  # recovered since the caller looked
            return snap
        placement = copy.deepcopy(snap.placement)
        free = {i: n.free_bytes(self.expert_bytes) for i, n in live.items()}
        try:
            moves = take_over(placement, missing, free, self.expert_bytes)
        except PlacementError as e:
            down = ", ".join(f"{n.name} ({n.error or n.link.error or 'down'})" for n in snap.nodes if n.down)
            raise UnavailableError(f"{e}; down: {down}" if down else str(e)) from None
        logger.warning("re-planning %s onto %s", describe(missing), ", ".join(live[i].name for i in moves))
        changed = {}
        for i, experts in moves.items():
            n = live[i]
            wanted = {l: sorted({*n.experts.get(l, ()), *experts.get(l, [])}) for l in {*n.experts, *experts}}
            try:
                self._call(n.link, lambda: n.link.assign(self.identity, wanted, self.assign_timeout), "re-planning")
            except ExpertmeshError as e:
                raise UnavailableError(f"no live node holds {describe(missing)}: {n.name} failed to load them "
                                       f"({e})") from None
            changed[n.name] = replace(n, experts=frozen_experts(wanted))
        return self._publish(snap.changed(placement, changed))

    def relocate(self, start: int, end: int, dead: NodeLink) -> NodeLink:
        """Have a live node run layers ``[start, end)`` of ``dead`` (the node
        itself, when it came back; else the one with the most free memory);
        its link. The router then rebuilds their KV.

        Raises:
            UnavailableError: naming the layers, when no live node has room or loads them.
        """
        return self.run(lambda: self._relocate(start, end, dead))

    def _relocate(self, start: int, end: int, dead: NodeLink) -> NodeLink:
        snap = self.snapshot
        _, holder = snap.stages[start]
        failures = []
        if holder.link is not dead and not holder.down:
            if holder.name != dead.name:  # moved already
                return holder.link
            try:  # the node itself came back: it takes its spans again (reloaded if it restarted)
                self._assign_stages(holder, list(holder.spans))
                return holder.link
            except ExpertmeshError as e:
                failures.append(str(e))
        need = self.span_bytes([(start, end)])
        free = {}
        for n in snap.nodes:
            if not n.down and n.link is not dead and n.name != dead.name:
                try:
                    info = self._call(n.link, n.link.get_info, "a look at its memory")
                    free[n.name] = (info.memory_budget_bytes - info.memory_used_bytes, n)
                except ExpertmeshError as e:
                    failures.append(str(e))
        for room, n in sorted(free.values(), key=lambda f: -f[0]):
            if room < need:
                break
            try:
                self._assign_stages(n, sorted({*n.spans, (start, end)}), taken_from=holder)
            except ExpertmeshError as e:
                failures.append(str(e))
                continue
            return n.link
        raise UnavailableError(f"layers {start}-{end - 1} ran on {dead!r}, which is down ({dead.error}), and no live "
                               f"node has {need / 1e6:.1f} MB free to take them over" +
                               (f" ({'; '.join(failures)})" if failures else ""))

    def _assign_stages(self, node: NodeState, spans: list[Span], taken_from: NodeState | None = None) -> None:
        self._call(node.link, lambda: self._load_stages(node.name, spans), "loading layers")
        changed = {node.name: replace(node, spans=tuple(spans), stage_bytes=self.span_bytes(spans))}
        if taken_from is not None and taken_from.name != node.name:
            moved = set(spans) - set(node.spans)
            changed[taken_from.name] = replace(taken_from, spans=tuple(s for s in taken_from.spans if s not in moved))
        self._publish(self.snapshot.changed(nodes=changed))

    # --- membership ---------------------------------------------------------------
    def admit(self, name: str, link: NodeLink, experts: Mapping[int, tuple[int, ...]]) -> bool:
        """Serve ``name`` through ``link`` from now on (a node that came back,
        assigned ``experts``); False when it should hold other experts by now."""
        def command() -> bool:
            node = self.snapshot.node(name)
            if dict(node.experts) != dict(experts):
                return False
            self._publish(self.snapshot.with_node(node, link=link, error=""))
            node.link.close(graceful=False)
            return True
        return self.run(command)

    def mark_down(self, name: str, error: str) -> None:
        """Record why ``name`` is down (beyond a broken link)."""
        self.run(lambda: self._publish(self.snapshot.with_node(self.snapshot.node(name), error=error)))

    # --- steps of a rebalance (run them inside a command) ------------------------------------
    def assign_sets(self, sets: Mapping[str, dict[int, list[int]]], progress: AssignProgressCallback) -> None:
        """Assign the named nodes these experts, in parallel; publish what each
        confirmed, the placement unchanged.

        Raises:
            UnavailableError: a node failed (what the others loaded is published).
        """
        snap = self.snapshot
        calls = {name: (snap.node(name).link,
                        lambda link=snap.node(name).link, e=experts: link.assign(self.identity, e, self.assign_timeout,
                                                                                progress))
                 for name, experts in sets.items()}
        results = self._calls(calls, "rebalancing")
        self._publish(snap.changed(nodes={name: replace(snap.node(name), experts=frozen_experts(sets[name]))
                                          for name, r in results.items() if not isinstance(r, ExpertmeshError)}))
        errors = [r for r in results.values() if isinstance(r, ExpertmeshError)]
        if errors:
            raise UnavailableError(f"rebalancing stopped: {errors[0]}")

    def switch(self, placement: Placement) -> Snapshot:
        """Route by ``placement`` from the next layer on (the nodes hold it already)."""
        return self._publish(self.snapshot.changed(placement))


def _started(call: Callable[[], object]) -> Future:
    done: Future = Future()

    def go() -> None:
        try:
            done.set_result(call())
        except BaseException as e:
            done.set_exception(e)
    threading.Thread(target=go, name="cluster-call", daemon=True).start()
    return done


def _mask(snap: Snapshot, live: Mapping[int, NodeState]) -> np.ndarray:
    return np.array([i in live for i in range(len(snap.placement.nodes))])


def _raise_first(results: Mapping[str, object]) -> None:
    for r in results.values():
        if isinstance(r, ExpertmeshError):
            raise r

