"""Membership: which nodes the router uses, and keeping them in use.

Nodes come from ``--peer`` and from mDNS. ``gather`` waits for them (for
``expect`` nodes, or until none new has appeared for ``settle`` seconds) and
reaches each; ``bring_up`` assigns the plan. Then one thread, ``watch``,
owns every change: a node whose Forward stream breaks, or that leaves mDNS
and stops answering, is down; a down node that is announced again, or
answers again at its address, is re-admitted and re-assigned its experts.
When no live node holds some experts, ``recover`` (called by the dispatcher
mid-layer) has live nodes with room load them.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..checkpoint import Identity
from ..discovery import Announcement, Bounds, Browser, resolve_interfaces
from ..errors import ConfigMismatchError, ExpertmeshError, OwnershipError, PlacementError, UnavailableError
from ..placement import Placement, describe, take_over
from ..serving import PROTOCOL_VERSION
from ..v1 import expertmesh_pb2 as pb
from .dispatcher import Dispatcher
from .link import AssignProgressCallback, NodeLink

if TYPE_CHECKING:
    from .router import RouterConfig

logger = logging.getLogger(__name__)

_MAX_BACKOFF = 10.0
_PROBE_TIMEOUT = 2.0
_CLOSE = object()


@dataclass
class Member:
    """A node of the plan."""

    name: str                                  # its name in the plan: mDNS instance, else the node's own
    link: NodeLink                             # replaced when the node comes back
    instance: str | None = None                # mDNS instance, when discovered
    experts: dict[int, list[int]] = field(default_factory=dict)
    stage_bytes: int = 0                       # weights of the pipeline stage spans it runs
    error: str = ""                            # why it is down, beyond a broken stream
    retry_at: float = 0.0
    backoff: float = 1.0

    @property
    def down(self) -> bool:
        return bool(self.error) or self.link.down


class Membership:
    """The router's live view of its nodes (see the module docstring)."""

    def __init__(self, config: RouterConfig, model_id: str, identity: Identity,
                 router_identity: pb.RouterIdentity | None = None, bounds: Bounds = Bounds()):
        if not config.peers and not config.discovery:  # before the router spends time loading its model
            raise UnavailableError("no nodes given: pass --peer HOST:PORT for each node, or turn discovery on")
        self.config = config
        self.model_id, self.identity, self.config_hash = model_id, identity, identity.config
        self.router_identity = router_identity or pb.RouterIdentity(id="membership")  # who we are to the nodes
        self.members: list[Member] = []
        self.seen: dict[str, Announcement] = {}  # mDNS instance -> latest announcement
        self._spares: set[str] = set()           # compatible instances outside the plan, logged once
        self.dispatcher: Dispatcher | None = None
        self.placement: Placement | None = None
        self.expert_bytes: dict[int, int] = {}
        self._lock = threading.Lock()            # one change of who holds what at a time
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.browser: Browser | None = None
        if config.discovery:
            self.browser = Browser(resolve_interfaces(config.interfaces),
                                   lambda instance, ann: self._events.put((instance, ann)), bounds)

    @property
    def links(self) -> list[NodeLink]:
        return [m.link for m in self.members]

    @property
    def changing(self) -> threading.Lock:
        """Held while who holds what changes: re-plans, re-admissions, rebalances."""
        return self._lock

    # --- before the plan --------------------------------------------------------
    def rejection(self, ann: Announcement) -> str:
        """Why a node cannot join this router's mesh ("" when it can)."""
        r = ann.record
        if r is None:
            return ann.problem
        if r.protocol != PROTOCOL_VERSION:
            return f"speaks protocol {r.protocol}, the router speaks {PROTOCOL_VERSION}"
        if r.config_hash != self.config_hash:
            return (f"serves model {r.model_id} (config {r.config_hash}), the router has "
                    f"{self.model_id} (config {self.config_hash})")
        if r.weights_hash and r.weights_hash != self.identity.weights:
            return f"serves model {r.model_id} with {self.identity.difference(r.config_hash, r.weights_hash, 'the router')}"
        return ""

    def compatible(self) -> list[Announcement]:
        return [a for a in list(self.seen.values()) if not self.rejection(a)]  # seen changes on the watch thread

    def gather(self) -> list[NodeLink]:
        """Wait for the nodes, reach each, and return their links (uniquely named).

        Raises:
            UnavailableError: too few nodes turned up, or none could be reached.
            ConfigMismatchError: a node serves another checkpoint or protocol.
            OwnershipError: a node given by --peer serves another router.
        """
        if self.browser is not None:
            self._wait_for_nodes()
        failures = []
        candidates = self._candidates()
        for address, instance in candidates.items():
            link = self._link(address)
            try:
                link.get_info()
                self._check(link)
            except ConfigMismatchError:
                link.close()
                raise
            except OwnershipError as e:
                link.close()
                if instance is None:  # named by --peer: the user meant this node
                    raise
                failures.append(str(e))  # found over mDNS: another mesh's node
                continue
            except ExpertmeshError as e:
                failures.append(str(e))
                link.close()
                continue
            self.members.append(Member(instance or link.name, link, instance))
        if not self.members:
            raise UnavailableError("no reachable node: " + "; ".join(failures))
        for failure in failures:
            logger.warning("skipping a node: %s", failure)
        names = [m.name for m in self.members]
        for m in self.members:  # two nodes of one name: keep both apart
            if names.count(m.name) > 1:
                m.name = f"{m.name}@{m.link.address}"
            m.link.name = m.name
        return self.links

    def _candidates(self) -> dict[str, str | None]:
        """HOST:PORT -> mDNS instance (None for a peer mDNS has not announced)."""
        found: dict[str, str | None] = {address: None for address in self.config.peers}
        for ann in sorted(self.compatible(), key=lambda a: a.instance):  # the same plan every time
            found[ann.address] = ann.instance
        return found

    def _link(self, address: str) -> NodeLink:
        return NodeLink(address, self.config.rpc_timeout, on_broken=self._events.put, security=self.config.security,
                        request_limit=self.config.request_limit, router_identity=self.router_identity)

    def release(self) -> None:
        """Tell every node this router is done with it, so another may take it without --takeover."""
        for m in self.members:
            m.link.release()

    def _check(self, link: NodeLink) -> None:
        info = link.info
        if info.protocol_version != PROTOCOL_VERSION:
            raise ConfigMismatchError(f"{link!r} speaks protocol {info.protocol_version}, router speaks {PROTOCOL_VERSION}")
        if info.config_hash != self.config_hash:
            raise ConfigMismatchError(
                f"{link!r} serves model {info.model_id} (config {info.config_hash}) but the router has "
                f"{self.model_id} (config {self.config_hash}): start both with the same checkpoint")
        if info.weights_hash != self.identity.weights:
            raise ConfigMismatchError(
                f"{link!r} serves model {info.model_id} with "
                f"{self.identity.difference(info.config_hash, info.weights_hash, 'the router')}: "
                f"start both with the same checkpoint")
        holder = info.router
        if holder.id and holder.id != self.router_identity.id and not self.router_identity.takeover:
            raise OwnershipError(f"{link!r} serves router {holder.id[:8]} at {holder.address}: stop that router, "
                                 "or start this one with --takeover to take the node from it")

    def _wait_for_nodes(self) -> None:
        """Until ``expect`` compatible nodes are seen, or (without ``expect``)
        until none new has turned up for ``settle`` seconds."""
        cfg = self.config
        deadline = time.monotonic() + cfg.discovery_timeout
        settled_at = time.monotonic() + cfg.settle
        while True:
            found = len(self._candidates())
            if (found >= cfg.expect) if cfg.expect else (found and time.monotonic() >= settled_at):
                return
            wake = min(settled_at, deadline) if found and not cfg.expect else deadline
            try:
                instance, ann = self._events.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                if found and not cfg.expect:
                    return
                raise UnavailableError(self._shortfall(found)) from None
            if self._note(instance, ann) and not cfg.expect:
                settled_at = time.monotonic() + cfg.settle  # someone new: give the others time too

    def _note(self, instance: str, ann: Announcement | None) -> bool:
        """Record an mDNS change; True when a compatible node is new."""
        old = self.seen.pop(instance, None)
        if ann is None:
            self._spares.discard(instance)
            logger.info("mDNS: %s left", instance)
            return False
        self.seen[instance] = ann
        why = self.rejection(ann)
        if old is None or why != self.rejection(old):
            if why:
                logger.warning("mDNS: %s at %s cannot join: %s", instance, ann.address, why)
            else:
                logger.info("mDNS: found %s at %s", instance, ann.address)
        return old is None and not why

    def _shortfall(self, found: int) -> str:
        cfg = self.config
        where = ", ".join(f"{i.name} ({i.ip})" for i in self.browser.mdns.interfaces)
        want = f"{cfg.expect} node{'s' * (cfg.expect != 1)}" if cfg.expect else "a node"
        seen = [f"{inst} at {address}" if inst else address for address, inst in self._candidates().items()]
        text = (f"waited {cfg.discovery_timeout:g}s for {want} serving {self.model_id} (config {self.config_hash}) "
                f"over mDNS on {where}; found {found}" + (f": {', '.join(seen)}" if seen else ""))
        rejected = [f"{a.instance} at {a.address} {why}" for a in self.seen.values() if (why := self.rejection(a))]
        if rejected:
            text += "; rejected " + "; ".join(rejected)
        if not self.seen:
            text += " (are the nodes on this network with discovery on? choose interfaces with --interface, or pass --peer HOST:PORT)"
        return text

    # --- the plan ----------------------------------------------------------------
    def bring_up(self, placement: Placement, expert_bytes: dict[int, int],
                 progress: AssignProgressCallback | None = None) -> None:
        """Assign every member its experts (in parallel, ``progress`` hearing
        each node's loading) and open its Forward stream.

        Raises:
            ExpertmeshError: a node refused or failed its assignment.
        """
        self.placement, self.expert_bytes = placement, expert_bytes
        errors: list[ExpertmeshError] = []

        def assign(member: Member) -> None:
            try:
                self._assign(member.link, member.experts, progress if member.experts else None)  # else stages
            except ExpertmeshError as e:
                errors.append(e)
        threads = []
        for member in self.members:
            member.experts = placement.experts_of(member.name)
            threads.append(threading.Thread(target=assign, args=(member,)))
            threads[-1].start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _assign(self, link: NodeLink, experts: dict[int, list[int]],
                progress: AssignProgressCallback | None = None) -> None:
        link.assign(self.identity, experts, self.config.assign_timeout, progress)
        link.get_info()
        link.open_stream()

    def recover(self, missing: dict[int, list[int]]) -> None:
        """Have live nodes with room load the ``missing`` experts (layer -> ids)
        that no live node holds, and record them in the placement once loaded.

        Raises:
            UnavailableError: naming the experts, when the live nodes lack the
                memory or fail to load them; what failed to load is not in the placement.
        """
        with self._lock:
            live = {i: m for i, m in enumerate(self.members) if not m.down}
            free = {i: m.link.info.memory_budget_bytes - m.stage_bytes
                    - sum(len(e) * self.expert_bytes[l] for l, e in m.experts.items()) for i, m in live.items()}
            try:  # planned on a copy: the placement changes only for what a node has loaded
                moves = take_over(copy.deepcopy(self.placement), missing, free, self.expert_bytes)
            except PlacementError as e:
                down = ", ".join(f"{m.name} ({m.error or m.link.error or 'down'})" for m in self.members if m.down)
                raise UnavailableError(f"{e}; down: {down}" if down else str(e)) from None
            logger.warning("re-planning %s onto %s", describe(missing), ", ".join(live[i].name for i in moves))
            for i, experts in moves.items():
                m = live[i]
                wanted = {l: sorted({*m.experts.get(l, []), *experts.get(l, [])}) for l in {*m.experts, *experts}}
                try:
                    m.link.assign(self.identity, wanted, self.config.assign_timeout)
                except ExpertmeshError as e:
                    raise UnavailableError(f"no live node holds {describe(missing)}: {m.name} failed to load them ({e})") from None
                m.experts = wanted
                for l, es in experts.items():
                    for e in es:
                        self.placement.add(l, e, i)

    # --- after the plan: one thread owns every change ----------------------------
    def watch(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._events.put(_CLOSE)
        if self._thread is not None:
            self._thread.join(timeout=_PROBE_TIMEOUT * 2)
        if self.browser is not None:
            self.browser.close()
        for link in self.links:
            link.close(graceful=not link.down)

    def _run(self) -> None:
        while True:
            due = [m.retry_at for m in self.members if m.down]
            try:
                event = self._events.get(timeout=max(0.0, min(due) - time.monotonic()) if due else None)
            except queue.Empty:
                event = None
            if event is _CLOSE:
                return
            try:
                if isinstance(event, NodeLink):
                    self._stream_broke(event)
                elif event is not None:
                    self._announced(*event)
                for m in self.members:
                    if m.down and m.retry_at <= time.monotonic():
                        self._readmit(m, self.seen[m.instance].address if m.instance in self.seen else m.link.address)
            except Exception:  # the watch must outlive any one bad event
                logger.exception("membership: unexpected error")

    def _stream_broke(self, link: NodeLink) -> None:
        member = next((m for m in self.members if m.link is link), None)
        if member is None:  # a link we have already replaced
            return
        if not member.error:
            logger.warning("node %s is down: %s", member.name, link.error)
        member.backoff = 1.0
        member.retry_at = time.monotonic() + member.backoff

    def _announced(self, instance: str, ann: Announcement | None) -> None:
        self._note(instance, ann)
        member = next((m for m in self.members if m.instance == instance), None)
        if ann is None:
            if member is not None and not member.down:
                self._probe(member)
            return
        if self.rejection(ann):
            return
        addresses = [f"{a}:{ann.port}" for a in ann.addresses]
        if member is None:  # a --peer that mDNS announces, or a node back under a new instance name?
            member = next((m for m in self.members if m.instance is None and m.link.address in addresses), None) \
                or next((m for m in self.members if m.down and m.link.info.name == ann.record.name), None)
            if member is None:
                if instance not in self._spares:
                    self._spares.add(instance)
                    logger.info("node %s at %s joined after the plan was made: restart the router to give it experts",
                                instance, ann.address)
                return
            member.instance = instance
        if member.down or member.link.address not in addresses:
            self._readmit(member, ann.address)

    def _probe(self, member: Member) -> None:
        """It left mDNS: down unless it still answers."""
        probe = self._link(member.link.address)
        try:
            probe.get_info(_PROBE_TIMEOUT)
            logger.info("node %s left mDNS but still answers at %s: keeping it", member.name, member.link.address)
        except ExpertmeshError as e:
            member.error = f"left mDNS and does not answer ({e})"
            logger.warning("node %s is down: %s", member.name, member.error)
            member.link.close(graceful=False)
        finally:
            probe.close()

    def _readmit(self, member: Member, address: str) -> None:
        with self._lock:
            self._readmit_locked(member, address)

    def _readmit_locked(self, member: Member, address: str) -> None:
        link = self._link(address)
        try:
            link.get_info(_PROBE_TIMEOUT)
            self._check(link)
            link.name = member.name
            self._assign(link, member.experts)
        except OwnershipError:
            holder = link.info.router
            link.close()
            member.backoff = _MAX_BACKOFF
            member.retry_at = time.monotonic() + member.backoff
            error = f"taken over by router {holder.id[:8]} at {holder.address}"
            if member.error != error:
                member.error = error
                logger.warning("node %s serves another router now: %s", member.name, error)
            return
        except ExpertmeshError as e:
            link.close()
            member.backoff = min(member.backoff * 2, _MAX_BACKOFF)
            member.retry_at = time.monotonic() + member.backoff
            level = logging.DEBUG if isinstance(e, UnavailableError) else logging.WARNING  # not there yet / wrong
            logger.log(level, "node %s not back at %s: %s (next try in %gs)", member.name, address, e, member.backoff)
            return
        old, member.link = member.link, link
        member.error, member.backoff = "", 1.0
        self.dispatcher.replace(link)
        old.close(graceful=False)
        logger.info("node %s is back at %s: re-assigned %d experts in %d layers", member.name, address,
                    sum(len(e) for e in member.experts.values()), len(member.experts))
