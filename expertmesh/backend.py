"""Settings of MLX's backend for the processes that serve (nodes, the router).

MLX's CUDA backend records each evaluation's kernels as a CUDA graph and
updates and launches that graph (``MLX_USE_CUDA_GRAPHS``, on by default). A
generation loop that keeps the GPU busy (mlx-lm's ``generate``) hides that;
a node and a router cannot: every MoE layer or stage span is a small
evaluation that the process waits for. On the H200, in one session, with
CUDA graphs off in every process (``benchmarks/results/device-20261202-s8-graphs0.json``
against ``...-s8-graphs1.json``, ``benchmarks/device.py --stages auto expert``):
the mesh decoded 131 against 122 tok/s in auto mode and 36.4 against 34.6
in expert mode, and 8 streams 544 against 501; local mlx-lm decoded 213
against 222. ``benchmarks/uvm.py`` (``results/uvm-20261202-s8-a.json``): a
node-like round (a host input, 20 small kernels, the output read back)
149 against 209 µs. So serving processes turn CUDA graphs off unless the
environment says otherwise; Metal and the CPU backend do not read the
variable.
"""

from __future__ import annotations

import os

CUDA_GRAPHS = "MLX_USE_CUDA_GRAPHS"
OPS_PER_BUFFER = "MLX_MAX_OPS_PER_BUFFER"
# A node that sets stage steps running ahead (nodes/prelaunch.py) has MLX's
# CUDA backend commit a step's kernels in fewer, larger tasks: past 10 tasks
# in flight MLX waits for one to finish, and a step waiting behind its gate
# would not (at 100 kernels a task, the H200's default, a span of some 20
# layers and more). Nodes set it only with their steps set running.
PRELAUNCH_OPS_PER_BUFFER = "4000"


def for_serving(environ=os.environ, prelaunch: bool = False) -> None:
    """Set the backend up for a node or router process: before its first evaluation."""
    environ.setdefault(CUDA_GRAPHS, "0")
    if prelaunch:
        environ.setdefault(OPS_PER_BUFFER, PRELAUNCH_OPS_PER_BUFFER)
