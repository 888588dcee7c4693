"""The ``expertmesh`` command: node, router, generate, cluster."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .errors import ExpertmeshError


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="Distributed Mixture-of-Experts inference for MLX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("node", help="serve some routed experts of a checkpoint")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: pick a free one)")
    p.add_argument("--name", default="", help="node name (default: host name)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory for experts (default: 75%% of RAM)")

    p = sub.add_parser("router", help="run the dense model and drive the nodes")
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="port (default 50050; 0 picks a free one)")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a node (repeat for each)")
    p.add_argument("--forward-timeout", type=float, default=60.0, help="seconds a node may take for one layer")

    p = sub.add_parser("generate", help="generate text through a router")
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:50050", metavar="HOST:PORT")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)

    p = sub.add_parser("cluster", help="show the nodes and what they hold")
    p.add_argument("--router", default="127.0.0.1:50050", metavar="HOST:PORT")
    return parser


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run_node(args) -> None:
    from .nodes import Node, NodeConfig

    node = Node(NodeConfig(model=args.model, host=args.host, port=args.port,
                           name=args.name, memory_gb=args.memory_gb))
    node.start()
    print(f"expertmesh node {node.name} listening on {node.address} "
          f"(model {node.store.checkpoint.model_id}, budget {node.servicer.memory_budget / 1e9:.1f} GB)", flush=True)
    try:
        node.wait()
    finally:
        node.stop()


def run_router(args) -> None:
    from .discovery import parse_peers
    from .router import Router, RouterConfig

    try:
        peers = parse_peers(args.peer)
    except ValueError as e:
        raise ExpertmeshError(str(e)) from None
    router = Router(RouterConfig(model=args.model, peers=peers, host=args.host, port=args.port,
                                 forward_timeout=args.forward_timeout))
    try:
        router.connect()
        router.start()
        print(f"expertmesh router listening on {args.host}:{router.port} "
              f"({len(router.links)} nodes, model {router.checkpoint.model_id})", flush=True)
        router.wait()
    finally:
        router.stop()


def run_generate(args) -> None:
    from .client import Client

    with Client(args.router) as client:
        last = None
        for piece in client.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed):
            print(piece.text, end="", flush=True)
            last = piece
        print()
        if last is not None:
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s]", file=sys.stderr)


def run_cluster(args) -> None:
    from .client import Client
    from .ranges import compact

    with Client(args.router) as client:
        c = client.cluster()
    print(f"model {c.model_id} (config {c.config_hash}): {len(c.moe_layers)} MoE layers x {c.num_experts} experts")
    print(f"{'NODE':<16} {'ADDRESS':<22} {'STATE':<8} {'MEMORY (used/budget)':<22} EXPERTS PER LAYER")
    for n in c.nodes:
        ranges = {compact(e) for e in n.experts.values()}
        held = ranges.pop() + " (every layer)" if len(ranges) == 1 else "; ".join(
            f"L{l}: {compact(e)}" for l, e in sorted(n.experts.items()))
        memory = f"{n.memory_used_bytes / 1e6:.1f}/{n.memory_budget_bytes / 1e9:.1f} GB"
        print(f"{n.name:<16} {n.address:<22} {n.state:<8} {memory:<22} {held}")
        if n.error:
            print(f"{'':<16} error: {n.error}")


COMMANDS = {"node": run_node, "router": run_router, "generate": run_generate, "cluster": run_cluster}


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _stop_on_sigterm()
    try:
        COMMANDS[args.command](args)
    except ExpertmeshError as e:
        print(f"expertmesh {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
