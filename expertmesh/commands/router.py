"""expertmesh router: run the dense model and drive the nodes."""

import argparse
import sys
from pathlib import Path

from ..errors import ExpertmeshError
from ..progress import Progress
from ..signals import StopSignals
from . import at_least_one, compile_argument, discovery_arguments, metrics_argument, port, positive, security_arguments

HELP = "run the dense model and drive the nodes"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, type=Path,
                   help="checkpoint directory, or Hugging Face repo ORG/NAME[@REVISION] (fetches only the dense weights)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=50050, help="port (default 50050; 0 picks a free one)")
    p.add_argument("--http-port", type=port, default=None, help="also serve an OpenAI-compatible API on this port")
    p.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a node to use besides those found over mDNS (repeat for each)")
    discovery_arguments(p, "find nodes over mDNS")
    p.add_argument("--expect", type=int, default=None, metavar="N",
                   help="wait until N nodes of this model are found (default: until none new for --settle s)")
    p.add_argument("--settle", type=positive, default=3.0, metavar="SECONDS",
                   help="without --expect: plan once no new node has appeared for this long (default 3)")
    p.add_argument("--wait", type=positive, default=60.0, metavar="SECONDS",
                   help="give up when the nodes have not turned up after this long (default 60)")
    p.add_argument("--forward-timeout", type=positive, default=10.0, metavar="SECONDS",
                   help="seconds a node may stay silent on a request before it counts as down (default 10; "
                        "a node computing a long request says it is still working every 0.5 s)")
    p.add_argument("--request-limit", type=positive, default=300.0, metavar="SECONDS",
                   help="seconds a node may keep working on one request (a long prompt's prefill, say) before it "
                        "is taken to hang and counts as down (default 300)")
    p.add_argument("--replicas", type=at_least_one, default=1, metavar="N",
                   help="keep each expert on N nodes where memory allows, so a node can fail mid-generation (default 1)")
    p.add_argument("--placement-stats", type=Path, default=None, metavar="FILE",
                   help="place experts by the popularity in FILE (expertmesh calibrate --out, or stats --json): "
                        "even node load, hot experts copied into spare memory")
    p.add_argument("--rebalance-threshold", type=float, default=None, metavar="RATIO",
                   help="rebalance live whenever the balance ratio falls below RATIO (default off)")
    p.add_argument("--rebalance-interval", type=positive, default=30.0, metavar="SECONDS",
                   help="with --rebalance-threshold: seconds between checks (default 30)")
    p.add_argument("--rebalance-min-tokens", type=int, default=256, metavar="N",
                   help="with --rebalance-threshold: tokens since the last change before acting (default 256)")
    metrics_argument(p)
    compile_argument(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars while nodes load (default: when stderr is a terminal; else log lines)")
    security_arguments(p)
    p.add_argument("--mode", choices=("expert", "pipeline", "auto"), default="auto",
                   help="per layer: routed experts spread across the nodes (expert), whole layers on one node "
                        "(pipeline stages), or what the cost model measures faster (auto, the default)")
    p.add_argument("--draft-model", type=Path, default=None, metavar="DIR",
                   help="a small checkpoint with the same tokenizer, run on the router: greedy requests that start "
                        "alone are decoded speculatively, checking its guesses in one pass through the mesh")
    p.add_argument("--num-draft-tokens", type=at_least_one, default=3, metavar="N",
                   help="tokens the draft model proposes per pass (default 3)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="a prompt's tokens per chunk through consecutive pipeline stages: while one stage's node "
                        "runs a chunk, the stage before runs the next (default: 128 where those nodes run on "
                        "other hosts, whole prompts where they share one; 0: whole prompts)")
    p.add_argument("--takeover", action="store_true",
                   help="take nodes that serve another router (a node serves one router at a time; "
                        "the other router's requests then fail)")


def run(args) -> None:
    from .. import backend

    backend.for_serving()  # before mlx evaluates anything here
    from ..discovery import parse_peers
    from ..router import Router, RouterConfig
    from ..security import Security

    try:
        peers = parse_peers(args.peer)
    except ValueError as e:
        raise ExpertmeshError(str(e)) from None
    config = RouterConfig(model=args.model, peers=peers, host=args.host, port=args.port,
                          forward_timeout=args.forward_timeout, request_limit=args.request_limit,
                          replicas=args.replicas, discovery=args.discovery,
                          interfaces=args.interface, expect=args.expect, settle=args.settle,
                          discovery_timeout=args.wait, http_port=args.http_port,
                          metrics_port=args.metrics_port, mode=args.mode, draft_model=args.draft_model,
                          num_draft_tokens=args.num_draft_tokens,
                          security=Security.from_args(args), placement_stats=args.placement_stats,
                          rebalance_threshold=args.rebalance_threshold,
                          rebalance_interval=args.rebalance_interval,
                          rebalance_min_tokens=args.rebalance_min_tokens, takeover=args.takeover,
                          compile=args.compile,  # checked here, before any checkpoint is read
                          prefill_chunk=args.prefill_chunk)
    router = Router(config)
    stopped = False
    try:
        if router.membership.browser:
            interfaces = ", ".join(f"{i.name} ({i.ip})" for i in router.membership.browser.mdns.interfaces)
            wanted = _count(args.expect, "node") if args.expect else "nodes"
            print(f"expertmesh router looking for {wanted} over mDNS on {interfaces}", flush=True)
        with Progress("loading", bars=args.progress) as loading:
            router.connect(lambda node, p: loading.update(node, p.total_bytes if p.done else p.loaded_bytes,
                                                           p.total_bytes))
        for line in router.plan.describe(router.adapter.args.num_hidden_layers):
            print(line, flush=True)
        router.start()
        print(f"expertmesh router listening on {args.host}:{router.port} "
              f"({_count(len(router.links), 'node')}: {', '.join(l.name for l in router.links)}; "
              f"model {router.checkpoint.model_id})", flush=True)
        if router.http is not None:
            print(f"OpenAI-compatible API at {router.http.url}", flush=True)
        if router.metrics is not None:
            print(f"Prometheus metrics at {router.metrics.url}", flush=True)
        with StopSignals() as stop:  # serving until Ctrl-C or SIGTERM: noted, never raised into lock code
            stop.wait()
            _finish(router, stop)
            stop.end_at_once_on_the_next()  # a stop that hangs: Ctrl-C once more
            router.stop()
            stopped = True
        raise KeyboardInterrupt  # the command's status: stopped by a signal
    finally:
        if not stopped:
            router.stop()


def _finish(router, stop: StopSignals) -> None:
    """First Ctrl-C (or SIGTERM): refuse new requests, let the running ones
    finish; a second one ends them with UNAVAILABLE."""
    from ..router.router import STOPPED

    running = router.drain()
    if not running:
        return
    _say(f"shutting down; finishing {_count(running, 'request')} first, refusing new ones (Ctrl-C again ends "
         "them now)")
    while not router.engine.wait_drained(timeout=0.1):
        if stop.wait(0):
            ended = router.engine.abort(STOPPED)
            _say(f"ended {_count(ended, 'unfinished request')}")
            return


def _say(text: str) -> None:
    """One line on stderr, in one write: log lines of other threads do not split it."""
    sys.stderr.write(f"expertmesh router: {text}\n")
    sys.stderr.flush()


def _count(n: int, noun: str) -> str:
    """``1 node``, ``2 nodes``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
