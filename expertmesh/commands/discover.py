"""expertmesh discover: list the nodes announced over mDNS."""

from . import interface_argument

HELP = "list the nodes announced over mDNS"


def add_arguments(p) -> None:
    interface_argument(p)
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to listen (default 3)")
    p.add_argument("--expect", type=int, default=None, metavar="N", help="stop as soon as N nodes are seen")


def run(args) -> None:
    import queue
    import time

    from ..discovery import Browser, resolve_interfaces
    from ..ranges import per_layer
    from ..serving import PROTOCOL_VERSION

    news: queue.SimpleQueue = queue.SimpleQueue()
    seen = {}
    browser = Browser(resolve_interfaces(args.interface), lambda instance, ann: news.put((instance, ann)))
    try:
        deadline = time.monotonic() + args.timeout
        while (left := deadline - time.monotonic()) > 0 and not (args.expect and len(seen) >= args.expect):
            try:
                instance, ann = news.get(timeout=left)
            except queue.Empty:
                break
            if ann is None:
                seen.pop(instance, None)
            else:
                seen[instance] = ann
    finally:
        browser.close()
    where = ", ".join(f"{i.name} ({i.ip})" for i in browser.mdns.interfaces)
    print(f"{len(seen)} node(s) on {where}")
    print(f"{'INSTANCE':<16} {'ADDRESS':<22} {'STATE':<8} {'MODEL (config)':<34} {'BUDGET':<9} EXPERTS HELD")
    for instance, ann in sorted(seen.items()):
        r = ann.record
        if r is None:
            print(f"{instance:<16} {ann.address:<22} {'?':<8} {ann.problem}")
            continue
        model = f"{r.model_id} ({r.config_hash})" + (f" protocol {r.protocol}" if r.protocol != PROTOCOL_VERSION else "")
        budget = f"{r.memory_budget / 1e9:.1f} GB"
        print(f"{instance:<16} {ann.address:<22} {r.state:<8} {model:<34} {budget:<9} {per_layer(r.held) or '-'}")
