"""expertmesh router: run the dense model and drive the nodes."""

from pathlib import Path

from ..errors import ExpertmeshError
from . import discovery_arguments

HELP = "run the dense model and drive the nodes"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="port (default 50050; 0 picks a free one)")
    p.add_argument("--http-port", type=int, default=None, help="also serve an OpenAI-compatible API on this port")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a node to use besides those found over mDNS (repeat for each)")
    discovery_arguments(p, "find nodes over mDNS")
    p.add_argument("--expect", type=int, default=None, metavar="N",
                   help="wait until N nodes of this model are found (default: until none new for --settle s)")
    p.add_argument("--settle", type=float, default=3.0, metavar="SECONDS",
                   help="without --expect: plan once no new node has appeared for this long (default 3)")
    p.add_argument("--wait", type=float, default=60.0, metavar="SECONDS",
                   help="give up when the nodes have not turned up after this long (default 60)")
    p.add_argument("--forward-timeout", type=float, default=60.0, help="seconds a node may take for one layer")
    p.add_argument("--mode", choices=("expert", "pipeline", "auto"), default="expert",
                   help="per layer: routed experts spread across the nodes (expert, the default: it fails over), "
                        "whole layers on one node (pipeline stages), or what the cost model measures faster (auto)")


def run(args) -> None:
    from ..discovery import parse_peers
    from ..router import Router, RouterConfig

    try:
        peers = parse_peers(args.peer)
    except ValueError as e:
        raise ExpertmeshError(str(e)) from None
    if args.expect is not None and args.expect < 1:
        raise ExpertmeshError("--expect must be at least 1")
    router = Router(RouterConfig(model=args.model, peers=peers, host=args.host, port=args.port,
                                 forward_timeout=args.forward_timeout, discovery=args.discovery,
                                 interfaces=args.interface, expect=args.expect, settle=args.settle,
                                 discovery_timeout=args.wait, http_port=args.http_port, mode=args.mode))
    try:
        if router.membership.browser:
            interfaces = ", ".join(f"{i.name} ({i.ip})" for i in router.membership.browser.mdns.interfaces)
            wanted = f"{args.expect} nodes" if args.expect else "nodes"
            print(f"expertmesh router looking for {wanted} over mDNS on {interfaces}", flush=True)
        router.connect()
        for line in router.plan.describe(router.adapter.args.num_hidden_layers):
            print(line, flush=True)
        router.start()
        print(f"expertmesh router listening on {args.host}:{router.port} "
              f"({len(router.links)} nodes: {', '.join(l.name for l in router.links)}; "
              f"model {router.checkpoint.model_id})", flush=True)
        if router.http is not None:
            print(f"OpenAI-compatible API at {router.http.url}", flush=True)
        router.wait()
    finally:
        router.stop()
