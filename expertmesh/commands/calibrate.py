"""expertmesh calibrate: record which experts some prompts use, for placement."""

from pathlib import Path

import argparse

from ..errors import ExpertmeshError
from . import connect, router_arguments

HELP = "run prompts through a router and save which experts they used (for --placement-stats / plan --stats)"

EPILOG = """\
The prompts run through a live router, because an MoE layer's gate sees what
the previous layers' experts computed: only the whole model routes honestly.
The file counts the token-slots each expert got from these prompts (traffic
other clients sent meanwhile is counted too); it is a RouterStats message as
JSON, like `expertmesh stats --json`, which works as a stats file as well."""


def add_arguments(p) -> None:
    p.epilog = EPILOG
    router_arguments(p)
    p.add_argument("--prompts", required=True, type=Path, metavar="FILE", help="one prompt per line")
    p.add_argument("--out", type=Path, default=Path("stats.json"), metavar="FILE",
                   help="where to write the counts (default stats.json)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar (default: when stderr is a terminal; else log lines)")


def run(args) -> None:
    from ..popularity import write_stats
    from ..progress import Progress
    from ..router.stats import hot_experts

    if args.max_tokens < 1:
        raise ExpertmeshError("--max-tokens must be at least 1")
    try:
        prompts = [line for line in args.prompts.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ExpertmeshError(f"cannot read {args.prompts}: {e}") from None
    if not prompts:
        raise ExpertmeshError(f"{args.prompts} has no prompts (one per line)")
    with connect(args) as client:
        before = client.stats()
        with Progress("calibrating with", bars=args.progress, unit="prompts") as progress:
            for i, prompt in enumerate(prompts):
                progress.update(str(args.prompts), i, len(prompts))
                for _ in client.generate(prompt, max_tokens=args.max_tokens):
                    pass
            progress.update(str(args.prompts), len(prompts), len(prompts))
        after = client.stats()
    stats = _difference(after, before)
    write_stats(stats, args.out)
    hot = ", ".join(f"{l}:{e} ({share:.1%})" for l, e, share in hot_experts(stats, 5))
    print(f"{len(prompts)} prompts, {stats.tokens_processed} tokens through the model; balance ratio "
          f"{stats.balance_ratio:.3f} on the current placement; hot experts (layer:expert) {hot}")
    print(f"wrote {args.out}")


def _difference(after, before):
    """The routing counts of ``after`` less those of ``before`` (same router)."""
    import numpy as np

    from ..placement import balance_ratio
    from ..v1 import expertmesh_pb2 as pb

    earlier = {l.layer: l for l in before.layers}
    out = pb.RouterStats(num_experts=after.num_experts, top_k=after.top_k,
                         tokens_processed=after.tokens_processed - min(before.tokens_processed, after.tokens_processed))
    nodes = []
    for l in after.layers:
        b = earlier.get(l.layer)
        experts = np.array(l.expert_tokens, np.int64) - (np.array(b.expert_tokens, np.int64) if b else 0)
        node = np.array(l.node_tokens, np.int64) - (np.array(b.node_tokens, np.int64) if b else 0)
        if (experts < 0).any() or (node < 0).any():
            raise ExpertmeshError("the router's stats were reset during calibration: run it again")
        out.layers.add(layer=l.layer, expert_tokens=experts.tolist(), node_tokens=node.tolist(),
                       tokens=l.tokens - (b.tokens if b else 0))
        nodes.append(node)
    out.balance_ratio = balance_ratio(np.array(nodes)) if nodes else 0.0
    return out
