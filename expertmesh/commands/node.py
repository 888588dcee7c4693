"""expertmesh node: serve some routed experts of a checkpoint."""

import argparse
import os
from pathlib import Path

from ..signals import StopSignals
from . import compile_argument, discovery_arguments, metrics_argument, port, positive, security_arguments

HELP = "serve some routed experts of a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="checkpoint directory, or Hugging Face repo ORG/NAME[@REVISION] (fetches only this node's share)")
    p.add_argument("--host", default=None,
                   help="address to listen on (default: the --interface addresses; 127.0.0.1 without discovery)")
    p.add_argument("--port", type=port, default=0, help="port (default 0: pick a free one)")
    p.add_argument("--name", default="", help="node name (default: host name)")
    p.add_argument("--memory-gb", type=positive, default=None, help="memory for experts (default: 90%% of Metal's working set on Apple silicon, else 75%% of RAM)")
    p.add_argument("--kv-idle-timeout", type=positive, default=300.0, metavar="SECONDS",
                   help="pipeline stages: free a sequence's KV cache after it sat unused this long (default 300)")
    discovery_arguments(p, "announce this node over mDNS")
    metrics_argument(p)
    compile_argument(p)
    p.add_argument("--prebuild", action=argparse.BooleanOptionalAction, default=True,
                   help="pipeline stages: build a span's next decode step while waiting for it "
                        "(default: on; off for A/B measurements)")
    p.add_argument("--prelaunch", action=argparse.BooleanOptionalAction,
                   default=os.environ.get("EXPERTMESH_PRELAUNCH", "1") != "0",
                   help="pipeline stages on MLX's CUDA backend: also set that step running, its kernels waiting "
                        "on the GPU for the request (default: on unless EXPERTMESH_PRELAUNCH=0; off for A/B "
                        "measurements). Elsewhere a no-op")
    security_arguments(p)


def run(args) -> None:
    from .. import backend

    backend.for_serving(prelaunch=args.prelaunch)  # before mlx evaluates anything here
    from ..nodes import Node, NodeConfig
    from ..security import Security

    node = Node(NodeConfig(model=args.model, host=args.host, port=args.port, name=args.name,
                           memory_gb=args.memory_gb, kv_idle_timeout=args.kv_idle_timeout,
                           discovery=args.discovery, interfaces=args.interface,
                           metrics_port=args.metrics_port, security=Security.from_args(args),
                           compile=args.compile, prebuild=args.prebuild, prelaunch=args.prelaunch))
    stopped = False
    try:
        node.start()
        also = f" and {', '.join(node.addresses[1:])}" if node.addresses[1:] else ""
        print(f"expertmesh node {node.name} listening on {node.address}{also} "
              f"(model {node.store.checkpoint.model_id}, budget {node.core.memory_budget / 1e9:.1f} GB)",
              flush=True)
        if node.metrics is not None:
            print(f"Prometheus metrics at {node.metrics.url}", flush=True)
        if node.advertiser:
            interfaces = ", ".join(f"{i.name} ({i.ip})" for i in node.advertiser.mdns.interfaces)
            renamed = f" ({node.name} was taken)" if node.instance != node.name else ""
            print(f"expertmesh node {node.name} advertised over mDNS as {node.instance}{renamed} on {interfaces}",
                  flush=True)
        with StopSignals() as stop:  # serving until Ctrl-C or SIGTERM: noted, never raised into lock code
            stop.wait()
            stop.end_at_once_on_the_next()  # a stop that hangs: Ctrl-C once more
            node.stop()
            stopped = True
        raise KeyboardInterrupt  # the command's status: stopped by a signal
    finally:
        if not stopped:
            node.stop()
