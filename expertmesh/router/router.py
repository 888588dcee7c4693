"""Router: dense model + Planner + Dispatcher + InferenceService."""

from __future__ import annotations

import logging
import secrets
from typing import Iterator

from .. import compiled, costmodel
from .. import placement as planner
from ..checkpoint import Checkpoint
from ..discovery import Bounds
from ..errors import UnavailableError
from ..metrics import MetricsServer, router_families
from ..models import get_adapter
from ..popularity import read_load
from ..residency import WiredLimit
from ..serving import create_server, join_address, layer_experts, set_serving
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from .config import RouterConfig
from .dense import load_dense
from .dispatcher import Dispatcher
from .link import AssignProgressCallback, NodeLink
from .engine import Engine, Piece
from .membership import Membership
from .openai import OpenAIServer
from .rebalance import Rebalancer, Report
from .service import InferenceServicer
from .speculative import load_draft
from .stages import StageRuntime
from .state import ClusterState
from .stats import RoutingStats

__all__ = ["Router", "RouterConfig"]

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "the router is shutting down: try again once it is back"
STOPPED = "the router was stopped before this request finished: try again once it is back"


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
        compiled.configure(config.compile)  # before the dense model builds its decode steps
        self.checkpoint = Checkpoint(config.model)
        adapter = get_adapter(self.checkpoint.config)  # an unsupported model fails before any network use
        self.plan: costmodel.Plan | None = None  # as planned at connect (``state`` holds what is now)
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
            self.state = ClusterState(self.checkpoint.identity, config.assign_timeout,
                                      lambda spans: adapter.span_bytes(self.checkpoint.tensors, spans))
            self.model, self.tokenizer, self.adapter = load_dense(self.checkpoint)
            self.stage_runtime: StageRuntime | None = None  # the spans' runtime, once any are up
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
                self.state.close()
            self.server.stop(0)
            raise
        self.worker = self.engine.worker

    @property
    def links(self) -> list[NodeLink]:
        return self.membership.links

    @property
    def placement(self) -> planner.Placement | None:
        """Where the experts are now (the current snapshot's), None before ``connect``."""
        snap = self.state.snapshot
        return snap.placement if snap is not None else None

    # --- bringing the mesh up -------------------------------------------------
    def connect(self, progress: AssignProgressCallback | None = None) -> None:
        """Find the nodes, check they serve our checkpoint, plan, assign, and keep watching them.

        ``progress(node name, AssignProgress)`` hears each node's loading as it goes.
        """
        links = self.membership.gather()
        self.plan = self._plan(links)
        placement = self.plan.placement
        if placement.short:
            logger.warning("memory allows fewer than %d copies of %s", self.config.replicas,
                           planner.describe(placement.short))
        tensors = self.checkpoint.tensors
        expert_bytes = {l: self.adapter.expert_bytes(tensors, l) for l in placement.owners}
        self.state.bring_up(links, placement, expert_bytes, progress)
        self.routing = RoutingStats(self.adapter.moe_layers, self.adapter.num_experts, placement.nodes,
                                    self.adapter.top_k)
        self.dispatcher = Dispatcher(lambda: self.state.snapshot, self.config.forward_timeout, self.state.recover,
                                     self.routing)
        self.adapter.attach(self.model, self.dispatcher)
        if self.plan.stages:
            self._bring_up_stages(progress)
        self.membership.watch(self.state)
        self.identity.takeover = False  # taken once: recovery and rebalancing never take a node back
        self.rebalancer = Rebalancer(self.state, self.routing, self.adapter.num_experts, self.dispatcher.wait_unused,
                                     2 * self.config.forward_timeout)
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

    def _bring_up_stages(self, progress: AssignProgressCallback | None = None) -> None:
        """Load every node's spans (in parallel, ``progress`` hearing each
        node's loading as "NAME layers A-B"), then swap them into the model for stand-ins."""
        self.state.bring_up_stages(self.plan.stages, progress)
        runtime = StageRuntime([s for spans in self.plan.stages.values() for s in spans], self.config.forward_timeout,
                               lambda start: self.state.snapshot.stage_link(start), self.state.relocate, self.routing,
                               self.config.prefill_chunk)
        self.worker.run(runtime.install, self.model)
        self.stage_runtime = runtime
        self.engine.scheduler.on_step = runtime.sweep

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
        self.state.close()
        self.wired.stop()

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
        if self.state.snapshot is None:
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
        nodes = []
        for m in self.membership.members:
            n = self.membership.node(m)
            info = n.link.info
            nodes.append(pb.NodeStatus(
                name=m.name, address=n.link.address, state=pb.DOWN if n.down else info.state,
                memory_budget_bytes=info.memory_budget_bytes, memory_used_bytes=info.memory_used_bytes,
                experts=layer_experts(n.held()), error=n.error or n.link.error,
                stages=[pb.LayerSpan(start=a, end=b) for a, b in n.spans]))
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
