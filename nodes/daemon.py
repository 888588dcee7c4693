"""The node daemon: ExpertStore + ExpertServicer (+ advertiser, later)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import Checkpoint
from ..models import get_adapter
from ..serving import create_server, set_serving
from ..v1 import expertmesh_pb2_grpc as pb_grpc
from ..worker import MLXWorker
from .dataplane import DataPlane
from .service import ExpertServicer
from .store import ExpertStore

logger = logging.getLogger(__name__)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class NodeConfig:
    model: Path                       # checkpoint directory
    host: str = "127.0.0.1"           # address to listen on
    port: int = 0                     # 0 picks a free port
    name: str = ""                    # defaults to the host name
    memory_gb: float | None = None    # expert memory budget; default 75% of RAM


class Node:
    """A running node: ``Node.create(config)``, ``start()``, ``stop()``.

    Raises:
        ModelError: the checkpoint is missing or not a supported MoE.
        UnavailableError: the port cannot be bound.
    """

    def __init__(self, config: NodeConfig):
        self.config = config
        self.name = config.name or socket.gethostname()
        checkpoint = Checkpoint(config.model)
        self.store = ExpertStore(checkpoint, get_adapter(checkpoint.config))
        checkpoint.tensors  # fail now, not at the first Assign, on missing weights
        budget = config.memory_gb * 1e9 if config.memory_gb else 0.75 * physical_memory()
        self.worker = MLXWorker(f"mlx-{self.name}")
        self.servicer = ExpertServicer(self.name, self.store, int(budget), self.worker)
        self.server, self.port, self._health = create_server(
            f"{config.host}:{config.port}",
            lambda s: pb_grpc.add_ExpertServiceServicer_to_server(self.servicer, s),
            ["ExpertService"],
        )
        self.dataplane = DataPlane(config.host, self.servicer.forward)
        self.servicer.data_port = self.dataplane.port
        self.ready = threading.Event()

    @property
    def address(self) -> str:
        host = self.config.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> "Node":
        self.server.start()
        self.dataplane.start()
        set_serving(self._health, True)
        self.ready.set()
        logger.info("node %s serving %s on %s", self.name, self.store.checkpoint.model_id, self.address)
        return self

    def stop(self, grace: float = 1.0) -> None:
        set_serving(self._health, False)
        self.server.stop(grace).wait()
        self.dataplane.stop()
        self.worker.close()
        self.ready.clear()

    def wait(self) -> None:
        self.server.wait_for_termination()
