"""Membership: which nodes the router uses, and keeping them in use.

Nodes come from ``--peer`` and from mDNS. ``gather`` waits for them (for
``expect`` nodes, or until none new has appeared for ``settle`` seconds) and
reaches each. Once the cluster's state (router/state.py) holds the plan,
one thread, ``watch``, follows the nodes: a node whose Forward stream
breaks, or that leaves mDNS and stops answering, is down; a down node that
is announced again, or answers again at its address, is re-assigned its
experts on a fresh link, and the state's owner then admits it (a command).
This thread calls nodes; it changes no state but through the owner.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from ..checkpoint import Identity
from ..discovery import Announcement, Bounds, Browser, resolve_interfaces
from ..errors import ConfigMismatchError, ExpertmeshError, OwnershipError, UnavailableError
from ..serving import PROTOCOL_VERSION
from ..v1 import expertmesh_pb2 as pb
from .config import RouterConfig
from .link import NodeLink
from .snapshot import NodeState
from .state import ClusterState

logger = logging.getLogger(__name__)

_MAX_BACKOFF = 10.0
_PROBE_TIMEOUT = 2.0
_CLOSE = object()


@dataclass
class Member:
    """A node of the plan, as discovery knows it (what it holds and its live
    link are the cluster state's: ``Membership.node``)."""

    name: str                                  # its name in the plan: mDNS instance, else the node's own
    link: NodeLink                             # the link it was gathered on
    instance: str | None = None                # mDNS instance, when discovered
    retry_at: float = 0.0
    backoff: float = 1.0


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
        self.state: ClusterState | None = None
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.browser: Browser | None = None
        if config.discovery:
            self.browser = Browser(resolve_interfaces(config.interfaces),
                                   lambda instance, ann: self._events.put((instance, ann)), bounds)

    @property
    def links(self) -> list[NodeLink]:
        """Each member's current link."""
        return [self.node(m).link for m in self.members]

    def node(self, member: Member) -> NodeState:
        """What the cluster's state says of ``member`` (before the plan: its gathered link, holding nothing)."""
        snap = self.state.snapshot if self.state is not None else None
        return snap.node(member.name) if snap is not None else NodeState(member.name, member.link)

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
        for link in self.links:
            link.release()

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

    # --- after the plan: one thread follows the nodes ----------------------------------
    def watch(self, state: ClusterState) -> None:
        """Follow the nodes of ``state`` (which holds the plan now)."""
        self.state = state
        self._thread = threading.Thread(target=self._run, name="membership", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._events.put(_CLOSE)
        if self._thread is not None:
            self._thread.join(timeout=_PROBE_TIMEOUT * 2)
        if self.browser is not None:
            self.browser.close()
        for link in {id(l): l for l in [m.link for m in self.members] + self.links}.values():
            link.close(graceful=not link.down)

    def _run(self) -> None:
        while True:
            due = [m.retry_at for m in self.members if self.node(m).down]
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
                    if self.node(m).down and m.retry_at <= time.monotonic():
                        self._readmit(m, self.seen[m.instance].address if m.instance in self.seen
                                      else self.node(m).link.address)
            except Exception:  # the watch must outlive any one bad event
                logger.exception("membership: unexpected error")

    def _stream_broke(self, link: NodeLink) -> None:
        node = self.state.snapshot.node_of(link)
        if node is None:  # a link we have already replaced
            return
        member = next(m for m in self.members if m.name == node.name)
        if not node.error:
            logger.warning("node %s is down: %s", member.name, link.error)
        member.backoff = 1.0
        member.retry_at = time.monotonic() + member.backoff

    def _announced(self, instance: str, ann: Announcement | None) -> None:
        self._note(instance, ann)
        member = next((m for m in self.members if m.instance == instance), None)
        if ann is None:
            if member is not None and not self.node(member).down:
                self._probe(member)
            return
        if self.rejection(ann):
            return
        addresses = [f"{a}:{ann.port}" for a in ann.addresses]
        if member is None:  # a --peer that mDNS announces, or a node back under a new instance name?
            member = next((m for m in self.members if m.instance is None and self.node(m).link.address in addresses),
                          None) or next((m for m in self.members if self.node(m).down
                                         and self.node(m).link.info.name == ann.record.name), None)
            if member is None:
                if instance not in self._spares:
                    self._spares.add(instance)
                    logger.info("node %s at %s joined after the plan was made: restart the router to give it experts",
                                instance, ann.address)
                return
            member.instance = instance
        node = self.node(member)
        if node.down or node.link.address not in addresses:
            self._readmit(member, ann.address)

    def _probe(self, member: Member) -> None:
        """It left mDNS: down unless it still answers."""
        link = self.node(member).link
        probe = self._link(link.address)
        try:
            probe.get_info(_PROBE_TIMEOUT)
            logger.info("node %s left mDNS but still answers at %s: keeping it", member.name, link.address)
        except ExpertmeshError as e:
            error = f"left mDNS and does not answer ({e})"
            self.state.mark_down(member.name, error)
            logger.warning("node %s is down: %s", member.name, error)
            link.close(graceful=False)
        finally:
            probe.close()

    def _readmit(self, member: Member, address: str) -> None:
        """Assign the node at ``address`` what ``member`` holds, on a fresh link;
        then the owner admits it (none of this holds up the owner or a generation)."""
        node = self.node(member)
        link = self._link(address)
        try:
            link.get_info(_PROBE_TIMEOUT)
            self._check(link)
            link.name = member.name
            link.assign(self.identity, node.held(), self.config.assign_timeout)
            link.open_stream()
            if not self.state.admit(member.name, link, node.experts):
                raise UnavailableError(f"{member.name} was given other experts meanwhile")
        except OwnershipError:
            holder = link.info.router
            link.close()
            member.backoff = _MAX_BACKOFF
            member.retry_at = time.monotonic() + member.backoff
            error = f"taken over by router {holder.id[:8]} at {holder.address}"
            if node.error != error:
                self.state.mark_down(member.name, error)
                logger.warning("node %s serves another router now: %s", member.name, error)
            return
        except ExpertmeshError as e:
            link.close()
            member.backoff = min(member.backoff * 2, _MAX_BACKOFF)
            member.retry_at = time.monotonic() + member.backoff
            level = logging.DEBUG if isinstance(e, UnavailableError) else logging.WARNING  # not there yet / wrong
            logger.log(level, "node %s not back at %s: %s (next try in %gs)", member.name, address, e, member.backoff)
            return
        member.backoff = 1.0
        logger.info("node %s is back at %s: re-assigned %d experts in %d layers", member.name, address,
                    sum(len(e) for e in node.experts.values()), len(node.experts))
