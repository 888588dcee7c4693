"""expertmesh generate: generate text through a router."""

import sys

from . import add_sampling_arguments, sampling_options

HELP = "generate text through a router"


def add_arguments(p) -> None:
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:50050", metavar="HOST:PORT")
    add_sampling_arguments(p)


def run(args) -> None:
    from ..client import Client

    options = sampling_options(args)
    with Client(args.router) as client:
        last = None
        for piece in client.generate(args.prompt, options):
            print(piece.text, end="", flush=True)
            last = piece
        print()
        if last is not None:
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s]", file=sys.stderr)
