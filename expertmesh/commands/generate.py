"""expertmesh generate: generate text through a router."""

import sys

HELP = "generate text through a router"


def add_arguments(p) -> None:
    p.add_argument("prompt")
    p.add_argument("--router", default="127.0.0.1:50050", metavar="HOST:PORT")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def run(args) -> None:
    from ..client import Client

    with Client(args.router) as client:
        last = None
        for piece in client.generate(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_p=args.top_p, seed=args.seed):
            print(piece.text, end="", flush=True)
            last = piece
        print()
        if last is not None:
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s]", file=sys.stderr)
