"""Weights wired on Apple silicon; the budget a node offers by default."""

import logging

import mlx.core as mx

from expertmesh.nodes.daemon import physical_memory
from expertmesh.residency import WiredLimit, default_budget, working_set_bytes

GB = 10**9


def test_a_mac_offers_its_metal_working_set_not_its_ram():
    # a 16 GB mini: Metal recommends ~10.7 GB unless iogpu.wired_limit_mb is raised
    mini = {"memory_size": 16 * GB, "max_recommended_working_set_size": int(10.7 * GB)}
    assert working_set_bytes(mini) == int(10.7 * GB)
    assert abs(default_budget(16 * GB, mini) - 0.9 * 10.7 * GB) <= 1
    raised = {**mini, "max_recommended_working_set_size": 14 * GB}  # sysctl iogpu.wired_limit_mb=14000
    assert abs(default_budget(16 * GB, raised) - 0.9 * 14 * GB) <= 1


def test_elsewhere_the_budget_follows_ram():
    cpu = {"architecture": "x86_64", "device_name": "AMD EPYC"}
    assert working_set_bytes(cpu) is None
    assert default_budget(64 * GB, cpu) == int(0.75 * 64 * GB)


def test_off_apple_silicon_wiring_is_a_no_op_said_once(caplog):
    if working_set_bytes() is not None:  # an Apple silicon machine: not the path under test
        return
    wired = WiredLimit("node x")
    with caplog.at_level(logging.INFO, logger="expertmesh.residency"):
        wired.start()
        wired.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "expertmesh.residency"]
    assert len(lines) == 1 and "not wired" in lines[0], lines
    assert default_budget(physical_memory()) == int(0.75 * physical_memory())
    assert mx.set_wired_limit(0) == 0  # the limit was never changed


def test_serving_processes_turn_cuda_graphs_off_unless_the_environment_says_otherwise():
    from expertmesh import backend

    env: dict = {}
    backend.for_serving(env)
    assert env == {"MLX_USE_CUDA_GRAPHS": "0"}  # small evaluations that are waited for: faster without
    kept = {"MLX_USE_CUDA_GRAPHS": "1"}
    backend.for_serving(kept)
    assert kept == {"MLX_USE_CUDA_GRAPHS": "1"}  # a user's own choice stands
