"""The node daemon: ExpertStore + NodeCore, served by ExpertServicer and the DataPlane + Advertiser."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh import __version__, compiled
from expertmesh.checkpoint import Checkpoint
from expertmesh.discovery import Advertiser, NodeRecord, resolve_interfaces
from expertmesh.metrics import MetricsServer, node_families
from expertmesh.models import get_adapter
from expertmesh.nodes.core import NodeCore
from expertmesh.nodes.dataplane import DataPlane
from expertmesh.nodes.service import ExpertServicer
from expertmesh.nodes.stages import StageStore
from expertmesh.nodes.store import ExpertStore
from expertmesh.options import check, is_port, is_positive
from expertmesh.residency import WiredLimit, default_budget
from expertmesh.security import Security
from expertmesh.serving import PROTOCOL_VERSION, create_server, join_address, set_serving
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc
from expertmesh.worker import MLXWorker

logger = logging.getLogger(__name__)

_WILDCARDS = ("0.0.0.0", "::", "")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class NodeConfig:
    model: Path                       # checkpoint directory
    host: str | None = None           # address to listen on; default: the mDNS interfaces' addresses, else 127.0.0.1
    port: int = 0                     # 0 picks a free port
    name: str = ""                    # defaults to the host name
    memory_gb: float | None = None    # expert memory budget; default 90% of Metal's working set, else 75% of RAM
    discovery: bool = False           # announce the node over mDNS (the CLI's default)
    interfaces: list[str] = field(default_factory=list)  # names or IPs for mDNS; [] = every non-loopback one
    kv_idle_timeout: float = 300.0    # pipeline stages: free a sequence's KV cache unused this long
    metrics_port: int | None = None   # Prometheus /metrics on the first host; None: off, 0: a free port
    security: Security = field(default_factory=Security)  # cluster token and TLS files
    compile: bool = True              # mx.compile decode steps (off: for A/B measurements)
    prebuild: bool = True             # build a span's next decode step ahead (off: for A/B measurements)
    # and set it running behind a gate, on CUDA: for a node with its process to itself (the CLI's default; tests
    # and the demo run nodes beside other MLX work, which the GPU must not hold behind a gate)
    prelaunch: bool = False

    def __post_init__(self) -> None:
        """Raises InvalidRequestError naming the field at fault."""
        check(is_port(self.port), "port", f"port must be 0-65535, not {self.port!r}")
        check(is_port(self.metrics_port, optional=True), "metrics_port",
              f"metrics_port must be 0-65535, not {self.metrics_port!r}")
        check(is_positive(self.memory_gb, optional=True), "memory_gb",
              f"memory_gb must be a number above 0, not {self.memory_gb!r}")
        check(is_positive(self.kv_idle_timeout), "kv_idle_timeout",
              f"kv_idle_timeout must be a number above 0, not {self.kv_idle_timeout!r}")
        for name in ("discovery", "compile", "prebuild", "prelaunch"):
            check(isinstance(getattr(self, name), bool), name, f"{name} must be True or False")
        check(all(isinstance(i, str) and i for i in self.interfaces), "interfaces",
              "interfaces must be names or addresses")


class Node:
    """A running node: ``Node(config)``, ``start()``, ``stop()``.

    Raises:
        ModelError: the checkpoint is missing or not a supported MoE.
        UnavailableError: the port cannot be bound.
        DiscoveryError: an interface does not exist or cannot do mDNS.
    """

    def __init__(self, config: NodeConfig):
        self.config = config
        compiled.configure(config.compile)  # before the store builds its decode steps
        self.name = config.name or socket.gethostname().split(".")[0]
        checkpoint = Checkpoint(config.model)
        self.store = ExpertStore(checkpoint, get_adapter(checkpoint.config))
        checkpoint.identity  # fail now, not at the first Assign, on missing weights (it reads every header)
        interfaces = resolve_interfaces(config.interfaces) if config.discovery else []
        if config.host is None:
            hosts = [i.ip for i in interfaces] or ["127.0.0.1"]
        else:
            hosts = [config.host]
        budget = config.memory_gb * 1e9 if config.memory_gb else default_budget(physical_memory())
        self.wired = WiredLimit(f"node {self.name}")
        self.worker = MLXWorker(f"mlx-{self.name}")
        self.stages = StageStore(self.store, config.kv_idle_timeout, prebuild_steps=config.prebuild,
                                 prelaunch_steps=config.prelaunch)
        self.core = NodeCore(self.name, self.store, int(budget), self.worker, self.stages)
        self.servicer = ExpertServicer(self.core)
        self.server, self.port, self._health = create_server(
            [join_address(h, config.port) for h in hosts],
            lambda s: pb_grpc.add_ExpertServiceServicer_to_server(self.servicer, s),
            ["ExpertService"],
            security=config.security,
        )
        self.dataplane = DataPlane(hosts, self.core.forward_framed, security=config.security,
                                   hello_wanted=self.core.held_by_router, hello_error=self.core.hello_error,
                                   count=self.core.count_bytes, after=self.core.after_reply)
        self.core.on_router_change = self.dataplane.drop_all
        self.core.token_required = bool(config.security.token)
        self.core.data_port = self.dataplane.port
        self.addresses = [join_address(h, self.port) for h in hosts]
        self._metrics_host = hosts[0]
        self.metrics: MetricsServer | None = None
        self.advertiser: Advertiser | None = None
        if config.discovery:
            advertised = [i.ip for i in interfaces] if hosts[0] in _WILDCARDS else hosts
            self.advertiser = Advertiser(self.name, self.port, advertised, interfaces, self.record())
            self.core.on_state_change = self._republish
        self.ready = threading.Event()

    @property
    def address(self) -> str:
        return self.addresses[0]

    @property
    def instance(self) -> str | None:
        """The mDNS instance name (``mini-2`` when another ``mini`` was there first)."""
        return self.advertiser.instance if self.advertiser else None

    def record(self) -> NodeRecord:
        """What this node tells the network about itself."""
        ck, s = self.store.checkpoint, self.core
        return NodeRecord(self.name, PROTOCOL_VERSION, ck.model_id, ck.config_hash, s.memory_budget,
                          pb.NodeState.Name(s.state).lower(), self.store.held(), __version__, ck.identity.weights)

    def _republish(self) -> None:
        try:
            self.advertiser.update(self.record())
        except Exception as e:  # a stale TXT record must not fail an Assign
            logger.warning("could not update the mDNS record: %s", e)

    def start(self) -> "Node":
        self.wired.start()
        self.server.start()
        self.dataplane.start()
        if self.config.metrics_port is not None:
            self.metrics = MetricsServer(self._metrics_host, self.config.metrics_port,
                                         lambda: node_families(*self.core.snapshot(), self.core.info()),
                                         self.config.security)
        set_serving(self._health, True)
        if self.advertiser:
            self.advertiser.start()
        self.ready.set()
        logger.info("node %s serving %s on %s", self.name, self.store.checkpoint.model_id, self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        self.ready.clear()
        if self.advertiser:
            self.advertiser.close()  # goodbye first: routers stop counting on us
        set_serving(self._health, False)
        if self.metrics is not None:
            self.metrics.stop()
        self.server.stop(grace).wait()
        self.dataplane.stop()
        self.stages.close()
        self.worker.close()
        self.wired.stop()
