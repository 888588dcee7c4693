"""expertmesh generate: generate text through a router."""

import sys

from ..signals import interruptible
from . import add_sampling_arguments, connect, router_arguments, sampling_options

HELP = "generate text through a router"


def add_arguments(p) -> None:
    p.add_argument("prompt")
    router_arguments(p)
    add_sampling_arguments(p)


def run(args) -> None:
    options = sampling_options(args)
    with connect(args) as client:
        last = None
        for piece in interruptible(client.generate(args.prompt, options)):
            print(piece.text, end="", flush=True)
            last = piece
        print()
        if last is not None:
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s]", file=sys.stderr)
