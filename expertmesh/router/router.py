"""Router: dense model + Planner + Dispatcher + InferenceService."""

from __future__ import annotations

import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import costmodel
from .. import placement as planner
from ..checkpoint import Checkpoint
from ..discovery import Bounds
from ..errors import ExpertmeshError, UnavailableError
from ..metrics import MetricsServer, router_families
from ..models import get_adapter
from ..popularity import read_load
from ..residency import WiredLimit
from ..security import Security
from ..serving import create_server, join_address, layer_experts, set_serving
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from .batching import MAX_BATCH, MAX_WAITING
from .dense import load_dense
from .dispatcher import Dispatcher
from .link import REQUEST_LIMIT_S, AssignProgressCallback, NodeLink
from .engine import Engine, Piece
from .membership import Membership
from .openai import OpenAIServer
from .rebalance import Rebalancer, Report
from .service import InferenceServicer
from .speculative import load_draft
from .stages import StageRuntime
from .stats import RoutingStats

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "the router is shutting down: try again once it is back"
STOPPED = "the router was stopped before this request finished: try again once it is back"


@dataclass
class RouterConfig:
    model: Path                                    # checkpoint directory
    peers: list[str] = field(default_factory=list)  # node addresses, HOST:PORT
    host: str = "127.0.0.1"                        # address to listen on
    port: int = 50050                              # 0 picks a free port
    rpc_timeout: float = 10.0                      # GetInfo and other control calls
    assign_timeout: float = 600.0                  # a node loading its experts
    forward_timeout: float = 10.0                  # a node's silence on a request; then it counts as down
    request_limit: float = REQUEST_LIMIT_S         # a node still "working" on one request after this hangs
    replicas: int = 1                              # copies of every expert, where memory allows
    default_max_tokens: int = 256
    max_batch: int = MAX_BATCH                     # generations decoded together, one forward pass per step
    max_waiting: int = MAX_WAITING                 # generations queued beyond those; more get RESOURCE_EXHAUSTED
    http_port: int | None = None                   # OpenAI-compatible HTTP API; None: off, 0: a free port
    discovery: bool = False                        # find nodes over mDNS too (the CLI's default)
    interfaces: list[str] = field(default_factory=list)  # names or IPs for mDNS; [] = every non-loopback one
    expect: int | None = None                      # wait for this many nodes before planning
    settle: float = 3.0                            # without expect: plan once none new came for this long
    discovery_timeout: float = 60.0                # give up waiting for nodes after this long
    mode: str = "auto"                             # expert | pipeline | auto: see costmodel
    draft_model: Path | None = None                # a small model sharing the tokenizer: speculative decoding
    num_draft_tokens: int = 3                      # tokens the draft proposes per forward pass through the mesh
    metrics_port: int | None = None                # Prometheus /metrics; None: off, 0: a free port
    security: Security = field(default_factory=Security)  # cluster token and TLS files, both directions
    placement_stats: Path | None = None            # place experts by this popularity (stats JSON), not contiguously
    rebalance_threshold: float | None = None       # rebalance when the live balance ratio falls below; None: off
    rebalance_interval: float = 30.0               # seconds between automatic checks
    rebalance_min_tokens: int = 256                # tokens through the model since the last change before acting
    takeover: bool = False                         # take nodes that serve another router (it then stops using them)


class Router:
    """A running router: ``Router(config)``, ``connect()``, ``start()``, ``stop()``.

    Raises:
        ModelError: the checkpoint is missing or not a supported MoE.
        UnavailableError: too few nodes turned up or could be reached, or the port cannot be bound.
        ConfigMismatchError: a node serves a different checkpoint.
        PlacementError: the experts do not fit the nodes' memory.
        DiscoveryError: an interface does not exist or cannot do mDNS.
    """

    def __init__(self, config: RouterConfig):
        self.config = config
        self.checkpoint = Checkpoint(config.model)
        adapter = get_adapter(self.checkpoint.config)  # an unsupported model fails before any network use
        self.placement: planner.Placement | None = None
        self.plan: costmodel.Plan | None = None
        self.routing: RoutingStats | None = None
        self.dispatcher: Dispatcher | None = None
        self.http: OpenAIServer | None = None
        self.metrics: MetricsServer | None = None
        self.wired = WiredLimit("router")  # weights wired while serving, on Apple silicon
        self.rebalancer: Rebalancer | None = None
        self.membership: Membership | None = None
        # every port is bound before any node is touched: a router that cannot serve takes no node
        self.server, self.port, self._health = create_server(
            f"{config.host}:{config.port}",
            lambda s: pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self), s),
            ["InferenceService"],
            # a thread per stream, running or queued, and room beside them for control calls
            workers=config.max_batch + config.max_waiting + 16,
            security=config.security,
        )
        # who this router is to its nodes: each serves one router at a time (RouterIdentity)
        self.identity = pb.RouterIdentity(id=secrets.token_hex(16), address=join_address(config.host, self.port),
                                          takeover=config.takeover)
        try:
            if config.http_port is not None:
                self.http = OpenAIServer(self, config.host, config.http_port)
            # browsing starts now, so nodes are found while the dense model loads; their records name ids of this model
            bounds = Bounds(adapter.args.num_hidden_layers, adapter.num_experts, self.checkpoint.config_hash)
            self.membership = Membership(config, self.checkpoint.model_id, self.checkpoint.identity,
                                         self.identity, bounds)
            self.model, self.tokenizer, self.adapter = load_dense(self.checkpoint)
            draft = load_draft(config.draft_model, self.tokenizer, config.num_draft_tokens) if config.draft_model else None
            self.engine = Engine(self.model, self.tokenizer, self.checkpoint.config, config.default_max_tokens, draft,
                                 max_batch=config.max_batch, max_waiting=config.max_waiting)
            if config.metrics_port is not None:
                self.metrics = MetricsServer(config.host, config.metrics_port, lambda: router_families(self.stats()),
                                             config.security)
        except BaseException:
            if self.http is not None:
                self.http.stop()
            if self.membership is not None:
                self.membership.close()
            self.server.stop(0)
            raise
        self.worker = self.engine.worker

    @property
    def links(self) -> list[NodeLink]:
        return self.membership.links

    # --- bringing the mesh up -------------------------------------------------
    def connect(self, progress: AssignProgressCallback | None = None) -> None:
        """Find the nodes, check they serve our checkpoint, plan, assign, and keep watching them.

        ``progress(node name, AssignProgress)`` hears each node's loading as it goes.
        """
        links = self.membership.gather()
        self.plan = self._plan(links)
        self.placement = self.plan.placement
        if self.placement.short:
            logger.warning("memory allows fewer than %d copies of %s", self.config.replicas,
                           planner.describe(self.placement.short))
        tensors = self.checkpoint.tensors
        expert_bytes = {l: self.adapter.expert_bytes(tensors, l) for l in self.placement.owners}
        self.membership.bring_up(self.placement, expert_bytes, progress)
        self.routing = RoutingStats(self.adapter.moe_layers, self.adapter.num_experts, self.placement.nodes,
                                    self.adapter.top_k)
        self.dispatcher = Dispatcher(links, self.placement, self.config.forward_timeout, self.membership.recover,
                                     self.routing)
        self.adapter.attach(self.model, self.dispatcher)
        if self.plan.stages:
            self._bring_up_stages(links, progress)
        self.membership.watch(self.dispatcher)
        self.identity.takeover = False  # taken once: recovery and rebalancing never take a node back
        self.rebalancer = Rebalancer(self)
        logger.info("mesh ready: %s", ", ".join(l.name for l in links))

    # --- pipeline stages (costmodel.py, router/stages.py) ------------------------
    def _plan(self, links: list[NodeLink]) -> costmodel.Plan:
        if self.config.mode == "expert":
            nodes = [costmodel.NodeCost(l.name, l.info.memory_budget_bytes) for l in links]
        else:
            nodes = [costmodel.measure(l, self.adapter, self.config.assign_timeout) for l in links]
        load = None
        if self.config.placement_stats is not None:
            load = read_load(self.config.placement_stats, self.adapter.moe_layers, self.adapter.num_experts)
        plan = costmodel.choose(self.config.mode, nodes, self.adapter, self.checkpoint.tensors,
                                self.config.replicas, load)
        for line in plan.describe(self.adapter.args.num_hidden_layers):
            logger.debug("%s", line)  # the CLI prints the plan
        spread = bool(plan.placement.owners)
        if spread and load is not None:
            logger.info("experts placed by %s: balance ratio %.3f expected on its traffic",
                        self.config.placement_stats, planner.expected_balance(plan.placement, load))
        if not spread and (load is not None or self.config.replicas > 1):
            logger.warning("every layer runs as a pipeline stage on one node: --replicas and --placement-stats "
                           "do not apply (use --mode expert to spread and copy experts)")
        return plan

    def _bring_up_stages(self, links: list[NodeLink], progress: AssignProgressCallback | None = None) -> None:
        """Load every node's spans (in parallel, ``progress`` hearing each
        node's loading as "NAME layers A-B"), then swap them into the model for stand-ins."""
        by_name = {l.name: l for l in links}
        with ThreadPoolExecutor(max(len(self.plan.stages), 1)) as pool:
            for done in [pool.submit(self._assign_stages, name, spans, progress)
                         for name, spans in self.plan.stages.items()]:
                done.result()
        runtime = StageRuntime([(a, b, by_name[n]) for n, s in self.plan.stages.items() for a, b in s],
                               self.config.forward_timeout, self._relocate_stage, self.routing)
        self.worker.run(runtime.install, self.model)
        self.engine.scheduler.on_step = runtime.sweep

    def _assign_stages(self, name: str, spans: list[tuple[int, int]],
                       progress: AssignProgressCallback | None = None) -> None:
        member = next(m for m in self.membership.members if m.name == name)
        task = f"{name} layers {', '.join(f'{a}-{b - 1}' if b - a > 1 else str(a) for a, b in spans)}"
        member.link.assign_stages(self.checkpoint.identity, spans, self.config.assign_timeout,
                                  progress and (lambda update: progress(task, update)))
        member.stage_bytes = self.adapter.span_bytes(self.checkpoint.tensors, spans)
        self.plan.stages[name] = spans

    def _relocate_stage(self, start: int, end: int, dead: NodeLink) -> NodeLink:
        """Load layers ``[start, end)`` of a node that failed onto the live node
        with the most free memory (the router then rebuilds their KV).

        Raises:
            UnavailableError: naming the layers, when no live node has room or loads them.
        """
        need = self.adapter.span_bytes(self.checkpoint.tensors, [(start, end)])
        failures = []
        back = next((m for m in self.membership.members if m.name == dead.name and not m.down and m.link is not dead
                     and (start, end) in self.plan.stages.get(m.name, [])), None)
        if back is not None:  # the node itself came back: it takes its spans again (reloaded if it restarted)
            try:
                self._assign_stages(back.name, self.plan.stages[back.name])
                return back.link
            except ExpertmeshError as e:
                failures.append(str(e))
        free = {}
        for m in self.membership.members:
            if not m.down and m.link is not dead and m.name != dead.name:
                try:
                    info = m.link.get_info()
                    free[m.name] = (info.memory_budget_bytes - info.memory_used_bytes, m)
                except ExpertmeshError as e:
                    failures.append(str(e))
        for room, m in sorted(free.values(), key=lambda f: -f[0]):
            if room < need:
                break
            try:
                self._assign_stages(m.name, sorted({*self.plan.stages.get(m.name, []), (start, end)}))
            except ExpertmeshError as e:
                failures.append(str(e))
                continue
            self.plan.stages[dead.name] = [s for s in self.plan.stages.get(dead.name, []) if s != (start, end)]
            return m.link
        raise UnavailableError(f"layers {start}-{end - 1} ran on {dead!r}, which is down ({dead.error}), and no live "
                               f"node has {need / 1e6:.1f} MB free to take them over" +
                               (f" ({'; '.join(failures)})" if failures else ""))

    def start(self) -> "Router":
        self.wired.start()
        self.server.start()
        if self.http is not None:
            self.http.start()
        if self.config.rebalance_threshold is not None and self.rebalancer is not None:
            c = self.config
            self.rebalancer.watch(c.rebalance_threshold, c.rebalance_interval, c.rebalance_min_tokens)
        set_serving(self._health, True)
        return self

    def drain(self) -> int:
        """Stop taking requests (they get UNAVAILABLE "the router is shutting
        down"); returns how many are still being generated
        (``engine.wait_drained`` waits for them, ``engine.abort`` ends them)."""
        set_serving(self._health, False)
        return self.engine.drain(SHUTTING_DOWN)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving; requests still running end with UNAVAILABLE (drain first to let them finish)."""
        self.drain()
        self.engine.abort(STOPPED)
        if self.http is not None:
            self.http.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.server.stop(grace).wait()
        if self.rebalancer is not None:
            self.rebalancer.close()
        self.engine.close()
        self.membership.release()  # a later router takes the nodes without --takeover
        self.membership.close()
        self.wired.stop()

    def wait(self) -> None:
        self.server.wait_for_termination()

    # --- serving --------------------------------------------------------------
    def generate(self, prompt: str, **kw) -> Iterator[Piece]:
        """Stream the completion of ``prompt`` (see ``Engine.generate``).

        Raises:
            UnavailableError: not connected, or a node went down.
            InvalidRequestError: a bad request.
        """
        return self._connected_engine().generate(prompt, **kw)

    def chat(self, messages: list[dict], **kw) -> Iterator[Piece]:
        """Stream the reply to ``messages`` (see ``Engine.chat``); raises as ``generate``."""
        return self._connected_engine().chat(messages, **kw)

    def _connected_engine(self) -> Engine:
        if self.placement is None:
            raise UnavailableError("the router is not connected to any node")
        return self.engine

    def rebalance(self, report: Report, **kw) -> None:
        """Move experts to even the load seen since the placement last changed
        (see ``Rebalancer.rebalance``; ``report`` hears each step).

        Raises:
            UnavailableError: not connected, a rebalance is running, or a node is down or failed.
            PlacementError: the nodes are too full to swap experts.
        """
        if self.rebalancer is None:
            raise UnavailableError("the router is not connected to any node")
        self.rebalancer.rebalance(report, **kw)

    def cluster(self) -> pb.ClusterInfo:
        """The planned nodes (down ones too), then nodes seen over mDNS that hold nothing."""
        nodes, stages = [], self.plan.stages if self.plan else {}
        for m in self.membership.members:
            info = m.link.info
            nodes.append(pb.NodeStatus(
                name=m.name, address=m.link.address, state=pb.DOWN if m.down else info.state,
                memory_budget_bytes=info.memory_budget_bytes, memory_used_bytes=info.memory_used_bytes,
                experts=layer_experts(m.experts), error=m.error or m.link.error,
                stages=[pb.LayerSpan(start=a, end=b) for a, b in stages.get(m.name, [])]))
        planned = {m.instance for m in self.membership.members}
        for ann in self.membership.compatible():
            if ann.instance not in planned:
                nodes.append(pb.NodeStatus(name=ann.instance, address=ann.address,
                                           state=pb.NodeState.Value(ann.record.state.upper()),
                                           memory_budget_bytes=ann.record.memory_budget))
        return pb.ClusterInfo(
            model_id=self.checkpoint.model_id, config_hash=self.checkpoint.config_hash,
            num_experts=self.adapter.num_experts, moe_layers=self.adapter.moe_layers, nodes=nodes)

    def stats(self, reset: bool = False) -> pb.RouterStats:
        """What was routed and served since the start or the last ``reset``; then reset if asked."""
        m = pb.RouterStats()
        self.engine.stats.fill(m)
        if self.routing is not None:
            self.routing.fill(m)
        if reset:
            self.engine.stats.reset()
            if self.routing is not None:
                self.routing.reset()
        return m
