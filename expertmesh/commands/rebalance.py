"""expertmesh rebalance: move or copy experts to even the node load, while generations run."""

import argparse

from ..errors import ExpertmeshError
from . import connect, router_arguments

HELP = "move or copy experts to even the node load the router has seen (generations keep running)"

EPILOG = """\
The router re-plans from the traffic since the placement last changed: hot
experts are copied into spare memory and experts moved so every node expects
the same load. New copies load first, traffic then switches between two
layers, and old copies are dropped last, so no request fails or changes its
output. Nodes without room for their old and new experts at once move them
in rounds (load what fits, switch, drop what has its new holder)."""

_SHOWN = 20  # moves listed before "... and N more"


def add_arguments(p) -> None:
    p.epilog = EPILOG
    router_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="show the plan, move nothing")
    p.add_argument("--threshold", type=float, default=0.0, metavar="RATIO",
                   help="act only when the balance ratio is below this (default 0: whenever it helps)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="N",
                   help="act only after N tokens since the placement last changed (default 0)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: when stderr is a terminal; else log lines)")


def run(args) -> None:
    from ..progress import Progress
    from ..v1 import expertmesh_pb2 as pb

    if not 0 <= args.threshold <= 1:
        raise ExpertmeshError("--threshold must be in [0, 1]")
    if args.min_tokens < 0:
        raise ExpertmeshError("--min-tokens must be 0 or more")
    phases = {pb.REBALANCE_LOADING: Progress("loading", bars=args.progress),
              pb.REBALANCE_DROPPING: Progress("dropping old copies, reloading", bars=args.progress)}
    with connect(args) as client:
        try:
            for p in client.rebalance(args.dry_run, args.threshold, args.min_tokens):
                if p.phase in phases:
                    task = p.node if p.round <= 1 else f"{p.node} (round {p.round})"
                    phases[p.phase].update(task, p.loaded_bytes, p.total_bytes)
                elif p.phase == pb.REBALANCE_PLANNED:
                    _print_plan(p)
                elif p.phase == pb.REBALANCE_SWITCHED:
                    print("switched: traffic follows the new placement", flush=True)
                elif p.phase == pb.REBALANCE_SKIPPED:
                    print(f"nothing moved: {p.message}")
                elif p.phase == pb.REBALANCE_DONE:
                    print(f"done: {p.message}")
        finally:
            for progress in phases.values():
                progress.close()
    if args.dry_run:
        print("dry run: nothing moved")


def _print_plan(p) -> None:
    print(f"balance ratio {p.balance_before:.3f} since the placement last changed; {p.balance_planned:.3f} "
          f"planned on the same traffic; {len(p.moves)} experts change holders", flush=True)
    for m in p.moves[:_SHOWN]:
        print(f"  layer {m.layer} expert {m.expert}: {', '.join(m.before)} -> {', '.join(m.after)}")
    if len(p.moves) > _SHOWN:
        print(f"  ... and {len(p.moves) - _SHOWN} more")
