"""expertmesh stats: what the router routed: node load, balance, hot experts, traffic."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExpertmeshError
from . import connect, router_arguments

HELP = "show what the router routed: node load, balance, hot experts, traffic"


def add_arguments(p) -> None:
    router_arguments(p)
    p.add_argument("--json", action="store_true", help="print the RouterStats message as JSON")
    p.add_argument("--top", type=int, default=10, metavar="N", help="hot experts to show (default 10)")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="write a heatmap of expert popularity and a bar chart of node load")
    p.add_argument("--reset", action="store_true", help="zero the router's counters after reading them")


def run(args) -> None:
    from google.protobuf import json_format

    if args.top < 0:
        raise ExpertmeshError("--top must be 0 or more")
    if args.plot is not None:
        figure = _figure_class()  # before the call, so --reset never loses counts to a missing matplotlib
    with connect(args) as client:
        s = client.stats(reset=args.reset)
    if args.json:
        print(json.dumps(json_format.MessageToDict(s, preserving_proto_field_name=True), indent=1))
    else:
        _print_table(s, args.top)
    if args.plot is not None:
        _plot(s, args.plot, figure)
        print(f"wrote {args.plot}")


def _print_table(s, top: int) -> None:
    from ..router.stats import hot_experts

    requests = ", ".join(f"{n} {kind}" for kind, n in sorted(s.requests.items())) or "no requests"
    print(f"{s.tokens_processed} tokens processed, {s.tokens_generated} generated ({requests}) "
          f"in {s.seconds:.1f} s; top-{s.top_k} of {s.num_experts} experts in {len(s.layers)} MoE layers")
    if s.tokens_generated:
        print(f"{s.round_trips} network round trips: {s.round_trips / s.tokens_generated:.1f} per generated token")
    total = sum(n.tokens for n in s.nodes) or 1
    print(f"{'NODE':<16} {'TOKENS':>10} {'SHARE':>6} {'REQUESTS':>9} {'SENT':>10} {'RECEIVED':>10} "
          f"{'RTT p50':>9} {'RTT p99':>9}")
    for n in s.nodes:
        print(f"{n.name:<16} {n.tokens:>10} {n.tokens / total:>6.1%} {n.requests:>9} {_bytes(n.bytes_sent):>10} "
              f"{_bytes(n.bytes_received):>10} {_quantile(n.rtt_seconds, 0.5):>9} {_quantile(n.rtt_seconds, 0.99):>9}")
    print(f"balance ratio {s.balance_ratio:.3f} (mean/max node load; 1 is even)")
    print(f"bytes per token {_bytes(s.bytes_per_token)} (sent + received)")
    if s.ttft_seconds.count:
        print(f"time to first token p50 {_quantile(s.ttft_seconds, 0.5)}, p99 {_quantile(s.ttft_seconds, 0.99)}")
    hot = hot_experts(s, top)
    if hot:
        print("hot experts (layer:expert, share of the layer): "
              + ", ".join(f"{l}:{e} ({share:.1%})" for l, e, share in hot))


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _quantile(histogram, q: float) -> str:
    """The bucket of a histogram of seconds holding its ``q`` quantile: "<=2.5ms" ("-" when empty)."""
    from ..metrics import quantile

    return _seconds(quantile(histogram, q)) if histogram.count else "-"


def _seconds(bound: float) -> str:
    """A histogram bucket's upper bound: "<= 2.5 ms"."""
    if bound == float("inf"):
        return "> 10 s"
    return f"<={bound * 1e3:g}ms" if bound < 1 else f"<={bound:g}s"


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ExpertmeshError("--plot needs matplotlib: pip install 'expertmesh[plot]' (or matplotlib)") from None
    return Figure


def _plot(s, path: Path, figure_class) -> None:
    """Expert popularity (MoE layers x experts) and token-slots per node, in one PNG."""
    import numpy as np

    counts = np.array([list(l.expert_tokens) for l in s.layers] or [[0]], dtype=np.float64)
    fig = figure_class(figsize=(10, 7), layout="constrained")
    heat, bars = fig.subplots(2, 1, height_ratios=[3, 2])
    image = heat.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    heat.set_title("expert popularity (token-slots routed)")
    heat.set_xlabel("expert")
    heat.set_ylabel("MoE layer")
    heat.set_yticks(range(len(s.layers)), [str(l.layer) for l in s.layers])
    fig.colorbar(image, ax=heat)
    bars.bar([n.name for n in s.nodes], [n.tokens for n in s.nodes], color="tab:orange")
    bars.set_title(f"node load (balance ratio {s.balance_ratio:.3f})")
    bars.set_ylabel("token-slots")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ExpertmeshError(f"cannot write {path}: {e}") from None
