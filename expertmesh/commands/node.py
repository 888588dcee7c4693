"""expertmesh node: serve some routed experts of a checkpoint."""

from pathlib import Path

HELP = "serve some routed experts of a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    p.add_argument("--name", default="", help="node name (default: host name)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory for experts (default: 75%% of RAM)")


def run(args) -> None:
    from ..nodes import Node, NodeConfig

    node = Node(NodeConfig(model=args.model, host=args.host, port=args.port,
                           name=args.name, memory_gb=args.memory_gb))
    node.start()
    print(f"expertmesh node {node.name} listening on {node.address} "
          f"(model {node.store.checkpoint.model_id}, budget {node.servicer.memory_budget / 1e9:.1f} GB)", flush=True)
    try:
        node.wait()
    finally:
        node.stop()
