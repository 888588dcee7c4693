"""Router: dense model + Planner + Dispatcher + InferenceService."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


from .. import placement as planner
from ..checkpoint import Checkpoint
from ..errors import ConfigMismatchError, ExpertmeshError, UnavailableError
from ..serving import PROTOCOL_VERSION, create_server, layer_experts, set_serving
from ..v1 import expertmesh_pb2 as pb
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from .dense import load_dense
from .dispatcher import Dispatcher, NodeLink
from .engine import Engine, Piece
from .openai import OpenAIServer
from .service import InferenceServicer

logger = logging.getLogger(__name__)


@dataclass
class RouterConfig:
    model: Path                                    # checkpoint directory
    peers: list[str] = field(default_factory=list)  # node addresses, HOST:PORT
    host: str = "127.0.0.1"                        # address to listen on
    port: int = 50050                              # 0 picks a free port
    rpc_timeout: float = 10.0                      # GetInfo and other control calls
    assign_timeout: float = 600.0                  # a node loading its experts
    forward_timeout: float = 60.0                  # one MoE layer on one node
    default_max_tokens: int = 256
    http_port: int | None = None                   # OpenAI-compatible HTTP API; None: off, 0: a free port


class Router:
    """A running router: ``Router(config)``, ``connect()``, ``start()``, ``stop()``.

    Raises:
        ModelError: the checkpoint is missing or not a supported MoE.
        UnavailableError: no node could be reached, or the port cannot be bound.
        ConfigMismatchError: a node serves a different checkpoint.
        PlacementError: the experts do not fit the nodes' memory.
    """

    def __init__(self, config: RouterConfig):
        self.config = config
        self.checkpoint = Checkpoint(config.model)
        self.model, self.tokenizer, self.adapter = load_dense(self.checkpoint)
        self.engine = Engine(self.model, self.tokenizer, self.checkpoint.config, config.default_max_tokens)
        self.worker = self.engine.worker
        self.links: list[NodeLink] = []
        self.placement: planner.Placement | None = None
        self.http: OpenAIServer | None = None
        self.server, self.port, self._health = create_server(
            f"{config.host}:{config.port}",
            lambda s: pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self), s),
            ["InferenceService"],
        )

    # --- bringing the mesh up -------------------------------------------------
    def connect(self) -> None:
        """Reach every peer, check it serves our checkpoint, plan, and assign."""
        if not self.config.peers:
            raise UnavailableError("no nodes given: pass --peer HOST:PORT for each node")
        reached, failures = [], []
        for address in self.config.peers:
            link = NodeLink(address, self.config.rpc_timeout)
            try:
                info = link.get_info()
            except ExpertmeshError as e:
                failures.append(str(e))
                link.close()
                continue
            if info.protocol_version != PROTOCOL_VERSION:
                raise ConfigMismatchError(f"{link!r} speaks protocol {info.protocol_version}, router speaks {PROTOCOL_VERSION}")
            if info.config_hash != self.checkpoint.config_hash:
                raise ConfigMismatchError(
                    f"{link!r} serves model {info.model_id} (config {info.config_hash}) but the router has "
                    f"{self.checkpoint.model_id} (config {self.checkpoint.config_hash}): start both with the same checkpoint")
            reached.append(link)
        if not reached:
            raise UnavailableError("no reachable node: " + "; ".join(failures))
        for failure in failures:
            logger.warning("skipping a peer: %s", failure)
        names = [l.name for l in reached]
        for i, link in enumerate(reached):  # two nodes of one name: keep both apart
            if names.count(link.name) > 1:
                link.name = f"{link.name}@{link.address}"
        tensors = self.checkpoint.tensors
        expert_bytes = {l: self.adapter.expert_bytes(tensors, l) for l in self.adapter.moe_layers}
        self.placement = planner.contiguous(
            [planner.NodeBudget(l.name, l.info.memory_budget_bytes) for l in reached],
            self.adapter.num_experts, expert_bytes)
        threads = []
        errors: list[ExpertmeshError] = []
        for link in reached:
            def run(link=link):
                try:
                    link.assign(self.checkpoint.config_hash, self.placement.experts_of(link.name), self.config.assign_timeout)
                except ExpertmeshError as e:
                    errors.append(e)
            threads.append(threading.Thread(target=run))
            threads[-1].start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for link in reached:
            link.get_info()
            link.open_stream()
        self.links = reached
        self.adapter.attach(self.model, Dispatcher(reached, self.placement, self.config.forward_timeout))
        logger.info("mesh of %d nodes ready: %s", len(reached), ", ".join(l.name for l in reached))

    def start(self) -> "Router":
        self.server.start()
        if self.config.http_port is not None:
            self.http = OpenAIServer(self, self.config.host, self.config.http_port).start()
        set_serving(self._health, True)
        return self

    def stop(self, grace: float = 1.0) -> None:
        set_serving(self._health, False)
        if self.http is not None:
            self.http.stop()
        self.server.stop(grace).wait()
        self.engine.close()
        for link in self.links:
            link.close()

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

    def cluster(self) -> pb.ClusterInfo:
        nodes = []
        for link in self.links:
            info = link.info
            down = bool(link.error)
            nodes.append(pb.NodeStatus(
                name=link.name, address=link.address,
                state=pb.DOWN if down else info.state,
                memory_budget_bytes=info.memory_budget_bytes, memory_used_bytes=info.memory_used_bytes,
                experts=layer_experts(self.placement.experts_of(link.name)), error=link.error))
        return pb.ClusterInfo(
            model_id=self.checkpoint.model_id, config_hash=self.checkpoint.config_hash,
            num_experts=self.adapter.num_experts, moe_layers=self.adapter.moe_layers, nodes=nodes)
