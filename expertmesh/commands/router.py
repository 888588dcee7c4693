"""expertmesh router: run the dense model and drive the nodes."""

from pathlib import Path

from ..errors import ExpertmeshError

HELP = "run the dense model and drive the nodes"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50050, help="port (default 50050; 0 picks a free one)")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT", help="a node (repeat for each)")
    p.add_argument("--http-port", type=int, default=None, help="also serve an OpenAI-compatible API on this port")
    p.add_argument("--forward-timeout", type=float, default=60.0, help="seconds a node may take for one layer")


def run(args) -> None:
    from ..discovery import parse_peers
    from ..router import Router, RouterConfig

    try:
        peers = parse_peers(args.peer)
    except ValueError as e:
        raise ExpertmeshError(str(e)) from None
    router = Router(RouterConfig(model=args.model, peers=peers, host=args.host, port=args.port,
                                 forward_timeout=args.forward_timeout, http_port=args.http_port))
    try:
        router.connect()
        router.start()
        print(f"expertmesh router listening on {args.host}:{router.port} "
              f"({len(router.links)} nodes, model {router.checkpoint.model_id})", flush=True)
        if router.http is not None:
            print(f"OpenAI-compatible API at {router.http.url}", flush=True)
        router.wait()
    finally:
        router.stop()
