"""``python -m expertmesh.builtin``: print where the built-in model is, or write a variant of it.

    expertmesh node --model "$(python -m expertmesh.builtin)"
    python -m expertmesh.builtin --draft              # the draft's directory
    python -m expertmesh.builtin --write DIR --layout hf
    python -m expertmesh.builtin --write DIR --bits 4
"""

import argparse
import logging
from pathlib import Path

from . import draft_dir, model_dir, write_variant


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m expertmesh.builtin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", action="store_true", help="print the draft model's directory")
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the model in another layout or quantized")
    parser.add_argument("--layout", default="mlx", choices=["mlx", "hf"])
    parser.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="quantize to this many bits")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    return parser


def main(argv=None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.write is None:
        if args.layout != "mlx" or args.bits:
            parser.error("--layout and --bits need --write DIR")
        print(draft_dir() if args.draft else model_dir())
        return 0
    if args.draft:
        parser.error("--draft prints the draft's directory; variants are written of the model")
    if args.bits and args.layout == "hf":
        parser.error("quantized checkpoints are written in the mlx layout only")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_variant(args.write, layout=args.layout, bits=args.bits, group_size=args.group_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
