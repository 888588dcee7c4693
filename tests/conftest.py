"""Shared fixtures: tiny checkpoints written at test time, real servers on loopback."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from expertmesh.nodes import Node, NodeConfig
from expertmesh.router import Router, RouterConfig
from expertmesh.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

# No test announces or browses over mDNS on this machine's real network:
# CLI processes started by tests default to --no-discovery; the tests that
# exercise discovery turn it on inside network namespaces they create.
os.environ["EXPERTMESH_DISCOVERY"] = "off"

VARIANTS = {
    "hf-f32": dict(layout="hf"),
    "mlx-f32": dict(layout="mlx"),
    "mlx-4bit": dict(layout="mlx", quantize={"bits": 4, "group_size": 64}),
    "sparse-step": dict(layout="hf", config_overrides={"decoder_sparse_step": 2, "mlp_only_layers": [1]}),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(root / name, seed=1, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny(checkpoints) -> Path:
    return checkpoints["mlx-f32"]


@contextlib.contextmanager
def running_nodes(model: Path, count: int, memory_gb: float = 1.0):
    nodes = [Node(NodeConfig(model=model, name=f"n{i}", memory_gb=memory_gb)).start() for i in range(count)]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop(grace=0)


@contextlib.contextmanager
def running_router(model: Path, peers: list[str], **kw):
    router = Router(RouterConfig(model=model, peers=peers, port=0, **kw))
    try:
        router.connect()
        router.start()
        yield router
    finally:
        router.stop(grace=0)


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the ``expertmesh`` CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


@pytest.fixture(scope="session")
def live_router(tiny):
    """One mesh for tests that only talk to it: 2 nodes, a router with its HTTP API on."""
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], http_port=0) as router:
        yield router


class NodeProcess:
    """``expertmesh node`` in a subprocess (loopback, no discovery), for tests
    that SIGKILL or SIGSTOP it; ``address`` once it printed that it listens."""

    def __init__(self, model: Path, name: str, memory_gb: float = 1.0):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertmesh.cli", "node", "--model", str(model), "--name", name,
             "--memory-gb", str(memory_gb), "--no-discovery"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=lambda: [self.lines.put(l) for l in self.proc.stdout], daemon=True).start()
        self.address = ""

    def wait_ready(self, timeout: float = 60) -> "NodeProcess":
        deadline = time.monotonic() + timeout
        while not self.address:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if m := re.search(r"listening on (\S+)", line):
                self.address = m.group(1)
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped node too
        self.proc.kill()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def node_processes(model: Path, count: int, memory_gb: float = 1.0):
    """``count`` node subprocesses, started in parallel; killed (and continued) on exit."""
    nodes = [NodeProcess(model, f"n{i}", memory_gb) for i in range(count)]
    try:
        yield [n.wait_ready() for n in nodes]
    finally:
        for n in nodes:
            n.stop()
