"""Shared fixtures: tiny checkpoints written at test time, real servers on loopback."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from expertmesh import hostcopy
from expertmesh.nodes import Node, NodeConfig
from expertmesh.router import Router, RouterConfig
from expertmesh.testing.process import Process, cli_args
from expertmesh.testing.tinymodel import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

# No test announces or browses over mDNS on this machine's real network: nodes and
# routers started here get --no-discovery first (testing.process.cli_args); the tests
# that exercise discovery turn it on, later on the line, inside namespaces they create.

VARIANTS = {
    "hf-f32": dict(layout="hf"),
    "mlx-f32": dict(layout="mlx"),
    "mlx-4bit": dict(layout="mlx", quantize={"bits": 4, "group_size": 64}),
    "sparse-step": dict(layout="hf", config_overrides={"decoder_sparse_step": 2, "mlp_only_layers": [1]}),
}


@pytest.fixture(params=["mlx", "buffers"])
def host_copies(request, monkeypatch) -> str:
    """A test that uses this runs twice: with MLX's own host reads and writes,
    and through ``expertmesh.hostcopy``'s one buffer per thread, emulated on
    the CPU (``EXPERTMESH_PINNED=emulate``, node processes too), so that every
    caller is held to the CUDA path's rule: what a read gives is good until
    the thread's next read, and a view kept longer reads other values."""
    monkeypatch.setenv(hostcopy.ENV, "emulate" if request.param == "buffers" else "0")
    hostcopy._reset()
    assert hostcopy.available() == (request.param == "buffers")
    yield request.param
    hostcopy._reset()  # decided again, after monkeypatch puts the environment back


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(root / name, seed=1, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="session")
def tiny(checkpoints) -> Path:
    return checkpoints["mlx-f32"]


@contextlib.contextmanager
def running_nodes(model: Path, count: int, memory_gb: float = 1.0, **kw):
    nodes = [Node(NodeConfig(model=model, name=f"n{i}", memory_gb=memory_gb, **kw)).start() for i in range(count)]
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop(grace=0)


@contextlib.contextmanager
def running_router(model: Path, peers: list[str], mode: str = "expert", **kw):
    """An in-process router, in expert mode unless a test asks for another: most
    tests here check how experts are placed, served and failed over; routers
    the tests start through the CLI run its default, auto."""
    router = Router(RouterConfig(model=model, peers=peers, port=0, mode=mode, **kw))
    try:
        router.connect()
        router.start()
        yield router
    finally:
        router.stop(grace=0)


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the ``expertmesh`` CLI in a fresh process."""
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *cli_args(args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


@pytest.fixture(scope="session")
def live_router(tiny):
    """One mesh for tests that only talk to it: 2 nodes, a router with its HTTP API on."""
    with running_nodes(tiny, 2) as nodes, running_router(tiny, [n.address for n in nodes], http_port=0) as router:
        yield router



@contextlib.contextmanager
def node_processes(model: Path, count: int, tmp: Path, memory_gb: float = 1.0):
    """``count`` ``expertmesh node`` subprocesses on loopback (started in
    parallel), for tests that SIGKILL or SIGSTOP them; continued and killed on exit."""
    procs = [Process(["node", "--model", str(model), "--name", f"n{i}", "--memory-gb", str(memory_gb),
                      "--no-discovery"], tmp / f"n{i}.log") for i in range(count)]
    try:
        yield [(p, p.address(timeout=60)) for p in procs]
    finally:
        for p in procs:
            p.proc.send_signal(signal.SIGCONT)
            p.proc.kill()
            p.proc.wait(timeout=30)


@contextlib.contextmanager
def in_threads(fn, count: int, timeout: float = 120):
    """``fn(0)`` … ``fn(count - 1)`` running at once, on threads of their own,
    while the block runs; on leaving it, each is waited for (at most
    ``timeout`` seconds) and the first error is raised. Yields their futures."""
    pool = ThreadPoolExecutor(count)
    try:
        runs: list[Future] = [pool.submit(fn, i) for i in range(count)]
        yield runs
        for run in runs:
            run.result(timeout=timeout)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung one fails the test instead of hanging it
